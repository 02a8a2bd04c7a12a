"""The adapter slot table: which adapter sits in which device slot, LRU eviction, pins, reference counts.

Slot 0 is the empty adapter and is never handed out. A slot referenced by a running request is never
evicted; when every slot is referenced, `acquire` returns None and the caller waits for a release
(no failure, no thrash). Loading an adapter and writing adapters into the layers are callbacks, so this
module holds no tensors and knows neither bundles nor models. A miss loads its adapter at once; the writes
wait for `write_pending`, which hands every adapter loaded since the last call to one `write`, so that
cold tasks admitted together are materialized together (routed tasks: one pass over the skills).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


class SlotsBusy(RuntimeError):
    """Slots a resize would drop hold adapters that running requests (or the zero-shot pin) still read."""


@dataclass
class CacheStats:
    """Counters of the slot table; lookups = hits + misses + waits."""

    lookups: int = 0
    hits: int = 0
    misses: int = 0
    waits: int = 0                  # lookups refused because every slot was referenced
    evictions: int = 0              # resident adapters dropped to make room for another
    load_seconds: float = 0.0       # materializing and writing adapters on misses, in total


class AdapterCache:
    """S slots of adapters keyed by any hashable key (the engine uses (task, version)).

    Args:
        n_slots: slots per layer, slot 0 included (usable slots are 1..n_slots-1).
        write: puts adapters (whatever `load` returns) into their slots of every layer, [(slot, adapter)].
    """

    def __init__(self, n_slots: int, write: Callable[[list[tuple[int, Any]]], None]) -> None:
        self.n_slots = n_slots
        self._write = write
        self._pending: list[tuple[int, Any]] = []  # loaded, not yet written: (slot, adapter)
        self._free = list(range(n_slots - 1, 0, -1))   # pop() hands out low slots first
        self._slot: dict[Hashable, int] = {}
        self._key: dict[int, Hashable] = {}
        self._refs: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # resident, unreferenced: LRU first
        self._stale: set[Hashable] = set()                 # to be freed at their last release
        self.stats = CacheStats()

    def acquire(self, key: Hashable, load: Callable[[], Any]) -> int | None:
        """A slot for `key`'s adapter, with one more reference; None when no slot can be had. On a miss the
        adapter is loaded now and in the slot after the next `write_pending`, which must come before the
        slot is read."""
        self.stats.lookups += 1
        slot = self._slot.get(key)
        if slot is not None:
            self.stats.hits += 1
        else:
            slot = self._take_slot()
            if slot is None:
                self.stats.waits += 1
                return None
            self.stats.misses += 1
            start = time.perf_counter()
            try:
                adapter = load()
            except BaseException:
                self._free.append(slot)
                raise
            self.stats.load_seconds += time.perf_counter() - start
            self._pending.append((slot, adapter))
            self._slot[key], self._key[slot], self._refs[slot] = slot, key, 0
        self._refs[slot] += 1
        self._idle.pop(slot, None)
        return slot

    def write_pending(self) -> None:
        """Write every adapter loaded since the last call into its slot, in one call of `write`. If that fails,
        their keys are forgotten and their slots freed (their references with them), and the error raised."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        start = time.perf_counter()
        try:
            self._write(pending)
        except BaseException:
            for slot, _ in pending:
                self._drop(slot)
            raise
        self.stats.load_seconds += time.perf_counter() - start

    def release(self, slot: int) -> None:
        """Drop one reference; an unreferenced slot becomes evictable, or free if its key went stale."""
        self._refs[slot] -= 1
        if self._refs[slot]:
            return
        if self._key[slot] in self._stale:
            self._drop(slot)
        else:
            self._idle[slot] = None

    def invalidate(self, key: Hashable) -> None:
        """`key` will never be asked for again (task replaced or removed): free its slot once unused."""
        slot = self._slot.get(key)
        if slot is None:
            return
        if self._refs[slot]:
            self._stale.add(key)
        else:
            self._idle.pop(slot)
            self._drop(slot)

    def resize(self, n_slots: int, resize_storage: Callable[[int], None]) -> None:
        """Use slots 1..n_slots-1 from now on: growing adds free slots; shrinking evicts the adapters idle in the
        slots it drops. `resize_storage(n_slots)` resizes the slots themselves, after the table has checked the
        change and before it applies it: if that fails, or a slot to drop is referenced (SlotsBusy), nothing
        changes."""
        dropped = range(n_slots, self.n_slots)
        busy = [slot for slot in dropped if self._refs.get(slot)]
        if busy:
            raise SlotsBusy(f"slots {busy} are in use by running requests or the zero-shot adapter: retry when "
                            f"they finish, or keep at least {max(busy) + 1} slots")
        resize_storage(n_slots)
        for slot in dropped:
            if slot in self._idle:
                del self._idle[slot]
                self.stats.evictions += 1
                del self._slot[self._key.pop(slot)], self._refs[slot]
                self._unqueue(slot)
        self._free = sorted({*(s for s in self._free if s < n_slots), *range(self.n_slots, n_slots)}, reverse=True)
        self.n_slots = n_slots

    def slot_of(self, key: Hashable) -> int | None:
        return self._slot.get(key)

    def refs(self, slot: int) -> int:
        return self._refs.get(slot, 0)

    def resident(self) -> dict[Hashable, int]:
        """Key -> slot of every adapter held in a slot."""
        return dict(self._slot)

    @property
    def n_free(self) -> int:
        return len(self._free)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        if not self._idle:
            return None
        victim, _ = self._idle.popitem(last=False)
        self.stats.evictions += 1
        del self._slot[self._key.pop(victim)], self._refs[victim]
        self._unqueue(victim)
        return victim

    def _drop(self, slot: int) -> None:
        key = self._key.pop(slot)
        del self._slot[key], self._refs[slot]
        self._stale.discard(key)
        self._unqueue(slot)
        self._free.append(slot)

    def _unqueue(self, slot: int) -> None:
        """Its adapter left the slot before being written: do not write it."""
        self._pending = [(s, adapter) for s, adapter in self._pending if s != slot]
