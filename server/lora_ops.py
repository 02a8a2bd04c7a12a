"""Multi-adapter LoRA for one linear layer: each row of a batch adds the adapter held in its own slot.

Slot tensors (preallocated by the layer, written by the adapter cache):
    A  [d_in, S, r]     B  [S, r, d_out]     (the adapter's alpha / r already folded into B)
A is slot-interleaved so that all slots together are one [d_in, S*r] matrix, as B is one [S*r, d_out].
Slot 0 is "no adapter": all zeros, so a row pointing at it gets exactly the base output.

`lora_reference` is the plain loop every fast path is tested against; `add_lora` is what layers call,
with a `SlotPlan` built once per batch (not once per layer) that picks the cheapest path:
    - no row has an adapter          -> nothing to add
    - every row has the same slot    -> two plain matmuls with that slot's A, B
    - decode rows, many of them      -> all slots at once: x @ A_all, zero the columns of other
                                        slots, @ B_all (reads each slot once, gathers nothing)
    - otherwise (prefill, few rows)  -> gather each row's A, B (index_select), two batched matmuls
Grouping rows by slot (a Python loop of index_select / index_add per distinct slot) was measured
slower than both on CPU at every batch size tried (docs/engine.md), so it is not kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SlotPlan:
    """Which slot each row of the current forward reads, and the shortcut that covers it.

    rows: slot index per row [N] (int64, on the model's device).
    uniform: the one slot every row uses, or None when rows differ. 0 means no adapter at all.
    row_mask: [N, 1, m, 1] one-hot of each row's slot among slots first..first+m-1 (the span of the
        slots the rows use; slot-0 rows are all zeros), in the model's dtype, set when the all-slots
        path pays off.
    first: the first slot of row_mask's span.
    """

    rows: Tensor
    uniform: int | None
    row_mask: Tensor | None = None
    first: int = 0

    @classmethod
    def of(cls, slots: list[int], device: torch.device | str, n_slots: int,
           dtype: torch.dtype = torch.float32) -> SlotPlan:
        """A plan from per-row slot indices held in Python (no device sync needed to pick the path).

        The all-slots path reads the span of slots the rows use whatever the batch, the gather path N
        rows' worth of weights: measured on CPU, all-slots wins once the rows are about half the span.
        Decode is bound by memory traffic on CPU, so reading only the span (not all `n_slots`) pays.
        """
        rows = torch.tensor(slots, dtype=torch.long, device=device)
        if not slots or all(s == slots[0] for s in slots):
            return cls(rows, slots[0] if slots else 0)
        used = [s for s in slots if s]
        first, last = min(used), max(used)
        if 2 * len(slots) < last - first + 1:
            return cls(rows, None)
        one_hot = (rows[:, None] == torch.arange(first, last + 1, device=device)).to(dtype)  # [N, m]
        return cls(rows, None, one_hot[:, None, :, None], first)


def lora_reference(x: Tensor, A: Tensor, B: Tensor, rows: Tensor) -> Tensor:
    """The adapter output, one row at a time.

    x [N, ..., d_in], A [d_in, S, r], B [S, r, d_out], rows [N] slot indices -> [N, ..., d_out].
    """
    out = [x[i] @ A[:, s] @ B[s] for i, s in enumerate(rows.tolist())]
    return torch.stack(out)


def lora_gather(x: Tensor, A: Tensor, B: Tensor, rows: Tensor) -> Tensor:
    """The adapter output with each row's weights gathered: two batched matmuls.

    x [N, ..., d_in], A [d_in, S, r], B [S, r, d_out], rows [N] -> [N, ..., d_out].
    """
    flat = x.reshape(x.shape[0], -1, x.shape[-1])                                   # [N, L, d_in]
    low = torch.bmm(flat, A.index_select(1, rows).transpose(0, 1))                  # [N, L, r]
    out = torch.bmm(low, B.index_select(0, rows))                                   # [N, L, d_out]
    return out.reshape(*x.shape[:-1], B.shape[-1])


def lora_all_slots(x: Tensor, A: Tensor, B: Tensor, row_mask: Tensor, base_out: Tensor | None = None,
                   first: int = 0) -> Tensor:
    """The adapter output through slots first..first+m-1 at once, keeping each row's own slot only
    (added into base_out in place, if given).

    x [N, L, d_in], A [d_in, S, r], B [S, r, d_out], row_mask [N, 1, m, 1] -> [N, L, d_out].
    Other slots' columns are multiplied by exact zeros, so they add exact zeros.
    """
    S, r = row_mask.shape[2], A.shape[2]
    A, B = A[:, first:first + S], B[first:first + S]                                # a view: rows strided
    low = (x @ A.flatten(1)).unflatten(-1, (S, r)).mul_(row_mask)                   # [N, L, S, r]
    low = low.reshape(-1, S * r)                                                    # [N*L, S*r]
    B_all = B.reshape(S * r, -1)                                                    # [S*r, d_out]
    if base_out is None:
        return (low @ B_all).reshape(*x.shape[:-1], B.shape[-1])
    base_out.view(low.shape[0], -1).addmm_(low, B_all)
    return base_out


def add_lora(base_out: Tensor, x: Tensor, A: Tensor, B: Tensor, plan: SlotPlan) -> Tensor:
    """base_out + each row's adapter output, by the cheapest path the plan allows.

    base_out [N, ..., d_out] is the frozen layer's (contiguous, freshly computed) output for x [N, ..., d_in];
    the adapter output is added into it in place, fused into the last matmul (addmm_): no extra op and no
    copy of the output per layer and step.
    """
    if plan.uniform == 0:
        return base_out
    if plan.uniform is not None:
        s = plan.uniform
        x2 = x.reshape(-1, x.shape[-1])                                             # [N*L, d_in]
        base_out.view(x2.shape[0], -1).addmm_(x2 @ A[:, s], B[s])
        return base_out
    if plan.row_mask is not None and x.dim() == 3 and x.shape[1] == 1:              # decode: one token per row
        return lora_all_slots(x, A, B, plan.row_mask, base_out, plan.first)
    return base_out.add_(lora_gather(x, A, B, plan.rows))
