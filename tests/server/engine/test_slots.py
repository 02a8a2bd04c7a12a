"""The slot table: hits, misses, LRU eviction of idle slots only, waiting when all are busy, stale keys,
misses written together by `write_pending`, and resizing."""

import pytest

from server.engine.slots import AdapterCache, SlotsBusy


class Loads:
    """Records every slot write, standing in for the model's slot storage."""

    def __init__(self):
        self.writes, self.calls = [], 0

    def write(self, items):
        self.writes += items
        self.calls += 1


def lookups_add_up(cache):
    s = cache.stats
    return s.lookups == s.hits + s.misses + s.waits


def test_hits_misses_and_lru_eviction():
    loads = Loads()
    cache = AdapterCache(3, loads.write)  # usable slots 1, 2
    a = cache.acquire("a", lambda: "A")
    b = cache.acquire("b", lambda: "B")
    cache.write_pending()
    assert {a, b} == {1, 2} and loads.writes == [(a, "A"), (b, "B")] and loads.calls == 1
    assert cache.acquire("a", lambda: pytest.fail("a hit must not load")) == a
    cache.release(a), cache.release(a), cache.release(b)   # "a" goes idle before "b"
    c = cache.acquire("c", lambda: "C")
    cache.write_pending()
    assert loads.writes[-1] == (c, "C") and loads.calls == 2
    assert c == a                     # "a" became idle first, so it is the least recently used
    assert cache.resident() == {"b": b, "c": c}
    s = cache.stats
    assert (s.hits, s.misses, s.evictions, s.waits) == (1, 3, 1, 0) and lookups_add_up(cache)
    assert s.load_seconds >= 0


def test_referenced_slots_are_never_evicted_and_callers_wait():
    loads = Loads()
    cache = AdapterCache(3, loads.write)
    a, b = cache.acquire("a", lambda: "A"), cache.acquire("b", lambda: "B")
    assert cache.acquire("c", lambda: "C") is None    # both slots referenced: wait, no thrash
    assert cache.resident() == {"a": a, "b": b} and cache.stats.evictions == 0
    cache.release(b)
    assert cache.acquire("c", lambda: "C") == b
    assert cache.refs(a) == 1 and cache.refs(b) == 1
    assert cache.stats.waits == 1 and lookups_add_up(cache)


def test_invalidated_key_is_freed_now_or_at_its_last_release():
    cache = AdapterCache(4, Loads().write)
    idle = cache.acquire("idle", lambda: "x")
    busy = cache.acquire("busy", lambda: "y")
    cache.release(idle)
    cache.invalidate("idle")
    assert "idle" not in cache.resident() and cache.n_free == 2
    cache.invalidate("busy")
    assert cache.resident() == {"busy": busy}  # its running request still reads the slot
    cache.release(busy)
    assert cache.resident() == {} and cache.n_free == 3
    cache.invalidate("never-loaded")           # harmless


def test_failed_load_gives_the_slot_back():
    cache = AdapterCache(2, Loads().write)

    def broken():
        raise RuntimeError("materialization failed")

    with pytest.raises(RuntimeError):
        cache.acquire("a", broken)
    assert cache.n_free == 1 and cache.resident() == {}
    assert cache.acquire("a", lambda: "A") == 1


def test_misses_are_written_together_and_only_while_they_hold_their_slot():
    loads = Loads()
    cache = AdapterCache(4, loads.write)
    cache.write_pending()
    assert loads.calls == 0                                   # nothing loaded: no write
    a, b = cache.acquire("a", lambda: "A"), cache.acquire("b", lambda: "B")
    assert cache.acquire("a", lambda: pytest.fail("a pending adapter is a hit")) == a
    assert loads.writes == []                                 # nothing written before write_pending
    cache.release(b)
    cache.invalidate("b")                                     # gone before it was written: never written
    c = cache.acquire("c", lambda: "C")
    cache.write_pending()
    assert loads.calls == 1 and sorted(loads.writes) == sorted([(a, "A"), (c, "C")])
    cache.write_pending()
    assert loads.calls == 1                                   # each adapter written once


def test_a_pending_adapter_evicted_before_its_write_is_not_written():
    loads = Loads()
    cache = AdapterCache(2, loads.write)                      # one usable slot
    a = cache.acquire("a", lambda: "A")
    cache.release(a)
    assert cache.acquire("b", lambda: "B") == a               # evicts "a", not yet written
    cache.write_pending()
    assert loads.writes == [(a, "B")] and cache.resident() == {"b": a}


def test_a_failed_write_forgets_its_adapters_and_frees_their_slots():
    def broken(items):
        raise RuntimeError("writing failed")

    cache = AdapterCache(3, broken)
    cache.acquire("a", lambda: "A"), cache.acquire("b", lambda: "B")
    with pytest.raises(RuntimeError, match="writing failed"):
        cache.write_pending()
    assert cache.resident() == {} and cache.n_free == 2
    assert cache.stats.misses == 2 and lookups_add_up(cache)


def test_resize_grows_and_shrinks_the_table_only_after_the_storage():
    loads, sizes = Loads(), []
    cache = AdapterCache(4, loads.write)
    a, b, c = (cache.acquire(k, lambda k=k: k.upper()) for k in "abc")
    cache.write_pending()
    assert (a, b, c) == (1, 2, 3)
    cache.release(c)
    cache.resize(6, sizes.append)                         # grow: slots 4 and 5 are new and free
    assert sizes == [6] and cache.n_free == 2 and cache.resident() == {"a": 1, "b": 2, "c": 3}
    assert cache.acquire("d", lambda: "D") == 4           # low slots first, as before
    cache.release(4)
    cache.resize(3, sizes.append)                         # shrink: idle "c" (3) and "d" (4) are evicted
    assert sizes == [6, 3] and cache.resident() == {"a": 1, "b": 2} and cache.n_free == 0
    assert cache.stats.evictions == 2 and lookups_add_up(cache)
    assert cache.acquire("e", lambda: "E") is None        # both slots referenced: waits, as at any size


def test_resize_changes_nothing_when_a_dropped_slot_is_referenced_or_the_storage_fails():
    cache = AdapterCache(4, Loads().write)
    cache.acquire("a", lambda: "A"), cache.acquire("b", lambda: "B"), cache.acquire("c", lambda: "C")
    cache.release(3)                                      # "c" idle: a shrink to 3 would evict it

    def fail(n):
        raise RuntimeError("out of memory")

    with pytest.raises(SlotsBusy, match=r"slots \[2\] are in use.*keep at least 3"):
        cache.resize(2, pytest.fail)                      # the storage is never touched
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.resize(3, fail)
    assert cache.n_slots == 4 and cache.resident() == {"a": 1, "b": 2, "c": 3} and cache.stats.evictions == 0
