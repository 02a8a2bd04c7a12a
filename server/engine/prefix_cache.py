"""Keys and values of prompt prefixes, kept for reuse: a prompt that starts like an earlier one, under the same
adapter, skips prefilling what they share.

Prefixes are whole blocks of `block` tokens. An entry holds the block-aligned prefix of one prompt (its keys
and values in every layer); the chain hash of each of its leading blocks points at it, so a later prompt that
shares any number of leading blocks with it finds them. The keys and values depend on the adapter (a LoRA on
k and v changes them), so the adapter's key starts every chain: a replaced task has a new key, its old entries
are never matched again and age out. Entries are evicted least recently used first within a byte budget.
This module holds tensors but knows no model: the engine reads and writes the rows of its KV cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from torch import Tensor

# a prefix's keys and values: one [kv_heads, tokens, head_dim] tensor per layer each
PrefixKV = tuple[list[Tensor], list[Tensor]]


@dataclass
class PrefixStats:
    """lookups = prompts checked; hits = those that found a prefix; hit_tokens = prompt tokens not prefilled."""

    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    stored: int = 0
    evictions: int = 0
    bytes: int = 0


@dataclass
class _Entry:
    tokens: list[int]
    kv: PrefixKV
    hashes: list[int]
    nbytes: int


class PrefixCache:
    """Prompt prefixes' keys and values within `max_bytes`, in blocks of `block` tokens."""

    def __init__(self, max_bytes: int, block: int = 16) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.max_bytes, self.block = max_bytes, block
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # by id, least recently used first
        self._index: dict[int, set[int]] = {}                     # chain hash -> the entries holding that prefix
        self._next_id = 0
        self.stats = PrefixStats()

    def lookup(self, adapter: Hashable, prompt: list[int]) -> tuple[PrefixKV, int] | None:
        """The keys and values of the longest cached prefix of `prompt` under `adapter`, and its length: whole
        blocks, leaving at least one prompt token to prefill (whose logits give the first token)."""
        self.stats.lookups += 1
        hashes = self._chain(adapter, prompt, (len(prompt) - 1) // self.block)
        for n_blocks in range(len(hashes), 0, -1):
            holders = self._index.get(hashes[n_blocks - 1])
            length = n_blocks * self.block
            entry_id = max(holders) if holders else None  # the newest
            if entry_id is None or self._entries[entry_id].tokens[:length] != prompt[:length]:
                continue
            self._entries.move_to_end(entry_id)
            self.stats.hits += 1
            self.stats.hit_tokens += length
            keys, values = self._entries[entry_id].kv
            return ([k[:, :length] for k in keys], [v[:, :length] for v in values]), length
        return None

    def store(self, adapter: Hashable, prompt: list[int], read: Callable[[int], PrefixKV]) -> None:
        """Keep the block-aligned prefix of `prompt` under `adapter`; `read(length)` copies its keys and values
        out of the KV cache. Nothing happens if it is cached already or larger than the whole budget."""
        hashes = self._chain(adapter, prompt, len(prompt) // self.block)
        if not hashes or hashes[-1] in self._index:
            return
        length = len(hashes) * self.block
        kv = read(length)
        nbytes = sum(t.nbytes for side in kv for t in side)
        if nbytes > self.max_bytes:
            return
        while self.stats.bytes + nbytes > self.max_bytes:
            self._evict()
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = _Entry(prompt[:length], kv, hashes, nbytes)
        for h in hashes:
            self._index.setdefault(h, set()).add(entry_id)
        self.stats.stored += 1
        self.stats.bytes += nbytes

    def _evict(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        for h in entry.hashes:
            self._index[h].discard(entry_id)
            if not self._index[h]:
                del self._index[h]
        self.stats.evictions += 1
        self.stats.bytes -= entry.nbytes

    def _chain(self, adapter: Hashable, tokens: list[int], n_blocks: int) -> list[int]:
        """Chain hashes of the first `n_blocks` blocks of `tokens`: each covers the adapter and every block
        before it."""
        out, h = [], hash(("prefix", adapter))
        for b in range(n_blocks):
            h = hash((h, *tokens[b * self.block:(b + 1) * self.block]))
            out.append(h)
        return out
