"""Multi-adapter LoRA for one linear layer: each row of a batch adds the adapter held in its own slot.

Slot tensors (preallocated by the layer, written by the adapter cache):
    A  [S, d_in, r]     B  [S, r, d_out]     (the adapter's alpha / r already folded into B)
Each slot's A and B are contiguous blocks. Slot 0 is "no adapter": all zeros, never written.

`lora_reference` is the plain loop every fast path is tested against; `add_lora` is what layers call,
with a `SlotPlan` built once per batch (not once per layer) that picks the path:
    - no row has an adapter        -> nothing to add
    - every row has the same slot  -> two plain matmuls with that slot's A, B
    - one token per row (decode),  -> the compiled CPU kernel when the engine has one (`server.cpu_kernel`):
      rows differ                     one pass, each token reads its own slot's A and B in place, rows
                                      without an adapter skipped
    - otherwise                    -> rows grouped by slot: the rows of every used slot (padded to the
                                      largest group) go through two batched matmuls over the span of used
                                      slots, so each slot's A and B are read once, in place, and no row is
                                      multiplied by another row's adapter; each row then takes its result.
Multiplying every row by every slot of the span and masking reads the same bytes but does `span` times
the work per row; gathering each row's A and B (index_select + bmm) copies them first. Neither measured
faster on CPU (docs/engine.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SlotPlan:
    """Which slot each row of the current forward reads, and how the rows are grouped by slot.

    rows: slot index per row [N] (int64, on the model's device).
    uniform: the one slot every row uses, or None when rows differ. 0 means no adapter at all.
    For mixed batches (uniform None), over the span of slots first..first+span-1 with `per_slot` places each:
    members: [span * per_slot] the row each (slot, place) multiplies; unused places repeat a member.
    adapted: [n] the rows that have an adapter (slot != 0), ascending; None when every row has one.
    places: [n] where each adapted row's result lies among the span * per_slot results.
    """

    rows: Tensor
    uniform: int | None
    first: int = 0
    span: int = 0
    per_slot: int = 0
    members: Tensor | None = None
    adapted: Tensor | None = None
    places: Tensor | None = None

    @classmethod
    def of(cls, slots: list[int], device: torch.device | str) -> SlotPlan:
        """A plan from per-row slot indices held in Python (no device sync needed to build it)."""
        rows = torch.tensor(slots, dtype=torch.long, device=device)
        if not slots or all(s == slots[0] for s in slots):
            return cls(rows, slots[0] if slots else 0)
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot:
                by_slot.setdefault(slot, []).append(row)
        first, span = min(by_slot), max(by_slot) - min(by_slot) + 1
        per_slot = max(map(len, by_slot.values()))
        filler = next(iter(by_slot.values()))[0]
        members, places = [filler] * (span * per_slot), {}
        for slot, group in by_slot.items():
            for place, row in enumerate(group):
                members[(slot - first) * per_slot + place] = row
                places[row] = (slot - first) * per_slot + place
        adapted = sorted(places)

        def tensor(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(rows, None, first, span, per_slot, tensor(members),
                   None if len(adapted) == len(slots) else tensor(adapted), tensor([places[r] for r in adapted]))


def lora_reference(x: Tensor, A: Tensor, B: Tensor, rows: Tensor) -> Tensor:
    """The adapter output, one row at a time.

    x [N, ..., d_in], A [S, d_in, r], B [S, r, d_out], rows [N] slot indices -> [N, ..., d_out].
    """
    out = [x[i] @ A[s] @ B[s] for i, s in enumerate(rows.tolist())]
    return torch.stack(out)


def lora_by_slot(x: Tensor, A: Tensor, B: Tensor, plan: SlotPlan) -> Tensor:
    """The adapter outputs of the plan's adapted rows [n, ..., d_out], grouped by slot (mixed batches).

    x [N, ..., d_in], A [S, d_in, r], B [S, r, d_out]. Row i of the result belongs to row plan.adapted[i]
    (to row i when plan.adapted is None).
    """
    m, R = plan.span, plan.per_slot
    grouped = x.index_select(0, plan.members)                                      # [m*R, ..., d_in]
    tokens = grouped.shape[1:-1].numel()
    low = torch.bmm(grouped.reshape(m, R * tokens, -1), A[plan.first:plan.first + m])       # [m, R*T, r]
    out = torch.bmm(low, B[plan.first:plan.first + m])                             # [m, R*T, d_out]
    return out.reshape(m * R, *x.shape[1:-1], -1).index_select(0, plan.places)


def add_lora(base_out: Tensor, x: Tensor, A: Tensor, B: Tensor, plan: SlotPlan,
             row_kernel: Callable | None = None) -> Tensor:
    """base_out + each row's adapter output, by the cheapest path the plan allows.

    base_out [N, ..., d_out] is the frozen layer's (contiguous, freshly computed) output for x [N, ..., d_in];
    the adapter output is added into it in place (fused into the last matmul where rows share a slot).
    Rows without an adapter are left exactly as they are. `row_kernel(y, x, A, B, slots)` (float32 CPU
    tensors) serves mixed decode batches when given.
    """
    if plan.uniform == 0:
        return base_out
    if plan.uniform is not None:
        s = plan.uniform
        x2 = x.reshape(-1, x.shape[-1])                                             # [N*L, d_in]
        base_out.view(x2.shape[0], -1).addmm_(x2 @ A[s], B[s])
        return base_out
    if row_kernel is not None and x.numel() == plan.rows.numel() * x.shape[-1]:  # decode: one token per row
        row_kernel(base_out.view(plan.rows.numel(), -1), x.reshape(plan.rows.numel(), -1).contiguous(), A, B,
                   plan.rows)
        return base_out
    if plan.adapted is None:  # every row has an adapter: a plain add, no scatter
        return base_out.add_(lora_by_slot(x, A, B, plan))
    return base_out.index_add_(0, plan.adapted, lora_by_slot(x, A, B, plan))
