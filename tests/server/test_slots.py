"""The slot table: hits, misses, LRU eviction of idle slots only, waiting when all are busy, stale keys."""

import pytest

from server.slots import AdapterCache


class Loads:
    """Records every slot write, standing in for the model's slot storage."""

    def __init__(self):
        self.writes = []

    def write(self, slot, lora):
        self.writes.append((slot, lora))


def lookups_add_up(cache):
    s = cache.stats
    return s.lookups == s.hits + s.misses + s.waits


def test_hits_misses_and_lru_eviction():
    loads = Loads()
    cache = AdapterCache(3, loads.write)  # usable slots 1, 2
    a = cache.acquire("a", lambda: "A")
    b = cache.acquire("b", lambda: "B")
    assert {a, b} == {1, 2} and loads.writes == [(a, "A"), (b, "B")]
    assert cache.acquire("a", lambda: pytest.fail("a hit must not load")) == a
    cache.release(a), cache.release(a), cache.release(b)   # "a" goes idle before "b"
    c = cache.acquire("c", lambda: "C")
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
