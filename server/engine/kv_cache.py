"""The KV cache of the running batch: preallocated per-layer key/value buffers, one row per sequence.

Owns the buffers, which rows are in use and how many positions of each are filled, and the attention
masks and position ids that go with them. Running sequences always occupy rows 0..n-1: when one
leaves, the last row moves into its place (TGI's "filter"), so a decode step works on plain views of
the buffers and never gathers. The engine decides which sequences run; this module only stores. The
buffers' dtype may differ from the model's (`kv_dtype`): `update` answers in the dtype it is given.

A prompt longer than a step's prefill budget is prefilled in chunks into one more row, the staging row
(`begin_chunk`), each chunk attending to the ones before it, and moves into a running row once whole
(`adopt_staged`); the running rows never hold a half-prefilled prompt. A prompt whose prefix is cached
(`server.engine.prefix_cache`) gets it copied into its row (`load_prefix`) and prefills the rest
(`begin_prefill_after`).

Buffers per layer: keys, values [max_rows + 1, kv_heads, max_len, head_dim]. Each `begin_*` call sets up
one part of a forward (decode rows, a group of prompts, a chunk) and returns its `Attention`: the mask,
the positions and where its keys and values go. One forward may hold several parts over disjoint rows:
the lean forward stores each part's keys and values with `store`; transformers' forward calls `update`
(the transformers Cache method) once per layer, which writes as the part last begun or `select`ed says.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def kv_dtype(setting: str, device: torch.device, model_dtype: torch.dtype, lean: bool) -> torch.dtype:
    """The cache's dtype for `ServerConfig.kv_dtype`. "auto": the model's, except a half-precision model run
    by the lean forward (`lean`, which attends in the cache's dtype) on a CPU without instructions for that
    type (AVX512-BF16 for bfloat16, AMX-FP16 for float16): float32, since torch's attention there converts
    every element it reads and takes 2-5x float32's time (measured). The transformers forward attends in
    the model's dtype, which a cache of another would have to convert whole at every layer."""
    if setting != "auto":
        return getattr(torch, setting)
    has_native = {torch.bfloat16: "_is_avx512_bf16_supported", torch.float16: "_is_amx_fp16_supported"}.get(model_dtype)
    if lean and device.type == "cpu" and has_native and not getattr(torch.cpu, has_native, bool)():
        return torch.float32
    return model_dtype


class Attention(NamedTuple):
    """One part of a forward: mask [n, 1, L, K] bool, positions [n, L], and where its keys and values go."""

    mask: Tensor
    positions: Tensor
    write: tuple


class KVCacheFull(RuntimeError):
    """No free row: the engine admits no more sequences than `max_rows`."""


class RowKVCache:
    """Static keys/values for up to `max_rows` sequences of up to `max_len` positions each."""

    def __init__(self, n_layers: int, max_rows: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (max_rows + 1, n_kv_heads, max_len, head_dim)  # the last row stages chunked prompts
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_rows, self.max_len, self.device, self.dtype = max_rows, max_len, device, dtype
        self.lengths: list[int] = []         # filled positions of rows 0..n_active-1
        self._write: tuple = ()              # what `update` does: the part last begun or selected

    @property
    def n_active(self) -> int:
        return len(self.lengths)

    @property
    def staging_row(self) -> int:
        """The row chunked prompts are prefilled into (`begin_chunk`) before they run."""
        return self.max_rows

    @property
    def n_free(self) -> int:
        return self.max_rows - self.n_active

    def add_rows(self, n: int) -> range:
        """Take `n` rows (empty, length 0) at the end of the running rows."""
        if n > self.n_free:
            raise KVCacheFull(f"{n} row(s) wanted, {self.n_free} free of {self.max_rows}")
        first = self.n_active
        self.lengths.extend([0] * n)
        return range(first, first + n)

    def clear(self) -> None:
        """Free every row (the buffers keep their contents, which no mask lets anything read)."""
        self.lengths = []

    def remove_row(self, row: int) -> int | None:
        """Free `row`; the last row moves into it. Returns the moved row's old index (None if none moved)."""
        last = self.n_active - 1
        if row != last:
            n = self.lengths[last]
            for buf in (*self.keys, *self.values):
                buf[row, :, :n].copy_(buf[last, :, :n])
            self.lengths[row] = n
        self.lengths.pop()
        return last if row != last else None

    def begin_prefill(self, rows: range, lengths: list[int]) -> Attention:
        """Set up prompts [len(rows), L] right-padded to L = max(lengths), into `rows`: mask [m, 1, L, L].

        Padded positions write keys past a row's length, which stay masked and are overwritten by later
        decode steps.
        """
        L = max(lengths)
        if L > self.max_len:
            raise ValueError(f"prompt of {L} tokens exceeds the cache length {self.max_len}")
        for row, n in zip(rows, lengths, strict=True):
            self.lengths[row] = n
        pos = torch.arange(L, device=self.device)
        valid = pos[None, :] < torch.tensor(lengths, device=self.device)[:, None]    # [m, L]
        mask = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]              # [m, L(q), L(k)]
        return self._begin(mask[:, None], pos.expand(len(lengths), L), ("prefill", rows.start, rows.stop))

    def begin_prefill_after(self, rows: range, lengths: list[int], starts: list[int]) -> Attention:
        """Set up prompts whose first `starts[i]` positions are in their rows already (a cached prefix,
        `load_prefix`): positions [s, n) of each, right-padded to L = max(n - s), attending to all positions
        before them: mask [m, 1, L, K] over K = min(max_len, max(s) + L).
        """
        if max(lengths) > self.max_len:
            raise ValueError(f"prompt of {max(lengths)} tokens exceeds the cache length {self.max_len}")
        for row, n in zip(rows, lengths, strict=True):
            self.lengths[row] = n
        L = max(n - s for n, s in zip(lengths, starts, strict=True))
        K = min(self.max_len, max(starts) + L)
        pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(L, device=self.device)  # [m, L]
        mask = torch.arange(K, device=self.device)[None, None, :] <= pos[:, :, None]                  # [m, L, K]
        return self._begin(mask[:, None], pos, ("after", rows.start, starts, K))

    def load_prefix(self, row: int, keys: list[Tensor], values: list[Tensor]) -> None:
        """Write a cached prefix (per layer [kv_heads, p, head_dim]) into positions [0, p) of `row`."""
        for buf, t in zip((*self.keys, *self.values), (*keys, *values), strict=True):
            buf[row, :, :t.shape[1]].copy_(t)

    def read_prefix(self, row: int, length: int) -> tuple[list[Tensor], list[Tensor]]:
        """A copy of positions [0, length) of `row`, per layer [kv_heads, length, head_dim]."""
        return ([k[row, :, :length].clone() for k in self.keys], [v[row, :, :length].clone() for v in self.values])

    def begin_chunk(self, start: int, length: int) -> Attention:
        """Set up positions [start, start + length) of one prompt into the staging row, attending to its
        positions before `start` (written by earlier chunks): mask [1, 1, length, start + length].
        """
        if start + length > self.max_len:
            raise ValueError(f"prompt of {start + length} tokens exceeds the cache length {self.max_len}")
        pos = torch.arange(start, start + length, device=self.device)
        mask = torch.arange(start + length, device=self.device)[None, :] <= pos[:, None]  # [L(q), start + L(k)]
        return self._begin(mask[None, None], pos[None], ("chunk", start, length))

    def adopt_staged(self, length: int) -> int:
        """Move the staging row's first `length` positions (a whole prompt) into a new running row; returns it."""
        row = self.add_rows(1).start
        for buf in (*self.keys, *self.values):
            buf[row, :, :length].copy_(buf[self.max_rows, :, :length])
        self.lengths[row] = length
        return row

    def begin_decode(self) -> Attention:
        """Set up one new token for each of the rows running now, written at each row's length: mask
        [n, 1, 1, K] over K = max length + 1. Rows added after this call are not part of it."""
        if max(self.lengths) >= self.max_len:
            raise ValueError("a running sequence reached the cache length")
        pos = torch.tensor(self.lengths, device=self.device)                         # [n]
        kv_len = max(self.lengths) + 1
        mask = torch.arange(kv_len, device=self.device)[None, :] <= pos[:, None]      # [n, K]
        # where each (row, kv head) writes in a layer's buffer viewed as [rows * heads * max_len, head_dim]:
        # one index_copy_ per layer and side, computed once per step for all layers
        _, heads, max_len, _ = self.keys[0].shape
        n = self.n_active
        rows_heads = torch.arange(n * heads, device=self.device).view(n, heads)       # row * heads + head
        flat = (rows_heads * max_len + pos[:, None]).flatten()                        # [n * heads]
        return self._begin(mask[:, None, None, :], pos[:, None], ("decode", flat, n, kv_len))

    def end_decode(self, step: Attention) -> None:
        """Count the token each row of the decode part `step` (from `begin_decode`) just wrote."""
        n = step.write[2]
        self.lengths[:n] = [length + 1 for length in self.lengths[:n]]

    def _begin(self, mask: Tensor, positions: Tensor, write: tuple) -> Attention:
        self._write = write
        return Attention(mask, positions, write)

    def select(self, part: Attention) -> None:
        """Make `update` write as `part` says (for a forward through transformers, one part at a time)."""
        self._write = part.write

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[Tensor, Tensor]:
        """The transformers Cache method: `store` as the part last begun or selected says."""
        return self.store(self._write, key_states, value_states, layer_idx)

    def store(self, write: tuple, key_states: Tensor, value_states: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Store one layer's new keys/values [m, kv_heads, q_len, head_dim] as a part's `Attention.write` says;
        return what that part attends to, in the dtype of `key_states` (the buffers' own may differ:
        `kv_dtype`)."""
        keys, values = self.keys[layer], self.values[layer]
        if write[0] == "prefill":
            _, first, stop = write
            L = key_states.shape[2]
            keys[first:stop, :, :L] = key_states
            values[first:stop, :, :L] = value_states
            return key_states, value_states
        if write[0] == "after":
            _, first, starts, K = write
            L = key_states.shape[2]
            for i, s in enumerate(starts):  # each row after its own prefix (padding past the cache dropped)
                end = min(s + L, self.max_len)
                keys[first + i, :, s:end] = key_states[i, :, :end - s]
                values[first + i, :, s:end] = value_states[i, :, :end - s]
            stop, dtype = first + len(starts), key_states.dtype
            return keys[first:stop, :, :K].to(dtype), values[first:stop, :, :K].to(dtype)
        if write[0] == "chunk":
            _, start, L = write
            stage, end = self.max_rows, start + L
            keys[stage, :, start:end] = key_states[0]
            values[stage, :, start:end] = value_states[0]
            return keys[stage:, :, :end].to(key_states.dtype), values[stage:, :, :end].to(key_states.dtype)
        _, flat, n, kv_len = write
        D = keys.shape[-1]                                # [n, kv_heads, head_dim] at each row's position:
        keys.view(-1, D).index_copy_(0, flat, key_states[:, :, 0].reshape(-1, D).to(self.dtype))
        values.view(-1, D).index_copy_(0, flat, value_states[:, :, 0].reshape(-1, D).to(self.dtype))
        dtype = key_states.dtype
        return keys[:n, :, :kv_len].to(dtype), values[:n, :, :kv_len].to(dtype)
