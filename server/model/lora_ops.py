"""Multi-adapter LoRA for one linear layer: each row of a batch adds the adapter held in its own slot.

Slot tensors (preallocated by the layer, written by the adapter cache):
    A  [S, d_in, r]     B  [S, r, d_out]     (the adapter's alpha / r already folded into B)
Each slot's A and B are contiguous blocks. Slot 0 is "no adapter": all zeros, never written.

`lora_reference` is the plain loop every fast path is tested against. On CPU (float32 or bfloat16) with the
compiled kernels, the layers' `PanelLinear` op adds the adapters in the frozen weight's own pass
(`server.model.layers`); everywhere else layers call `add_lora`, with a `SlotPlan` built once per batch (not once
per layer) that picks the path:
    - no row has an adapter        -> nothing to add
    - every row has the same slot  -> two plain matmuls with that slot's A, B
    - otherwise                    -> each row's A and B gathered ([N, d_in, r], [N, r, d_out]: small next
                                      to the activations), one bmm, then one batched multiply-add into
                                      the base output in place; a row of slot 0 gathers zeros and adds 0.
                                      A forward of packed parts (decode rows and prompts of other lengths)
                                      does this part by part, so that a prompt gathers one adapter per row,
                                      not per token.
Grouping rows by slot instead (gathering activations rather than weights, two bmm over the span of used
slots, a scatter back) measured 1.4-8x slower per layer on CPU: it copies and allocates [N, L, d]
activations three times where this copies a few adapter matrices (docs/engine.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SlotPlan:
    """Which slot each row of the current forward reads.

    rows: slot index per row [N] (int64, on the model's device).
    uniform: the one slot every row uses, or None when rows differ. 0 means no adapter at all.
    parts: for a forward of packed parts (`packed`: its rows are single tokens), each part's rows' length
        and own plan, in order; None for a forward of N equal rows.
    """

    rows: Tensor
    uniform: int | None
    parts: tuple[tuple[int, SlotPlan], ...] | None = None

    @classmethod
    def of(cls, slots: list[int], device: torch.device | str) -> SlotPlan:
        """A plan from per-row slot indices held in Python (no device sync needed to build it)."""
        rows = torch.tensor(slots, dtype=torch.long, device=device)
        if not slots:
            return cls(rows, 0)
        return cls(rows, slots[0] if all(s == slots[0] for s in slots) else None)

    @classmethod
    def packed(cls, parts: list[tuple[int, SlotPlan]]) -> SlotPlan:
        """The plan of a forward whose input packs parts of rows of `length` tokens each, given as
        (length, the part's plan), token after token ([sum of rows x length, d]): one row a token."""
        if len(parts) == 1 and parts[0][0] == 1:
            return parts[0][1]
        uniform = {plan.uniform for _, plan in parts}
        tokens = torch.cat([plan.rows.repeat_interleave(length) for length, plan in parts])
        return cls(tokens, uniform.pop() if len(uniform) == 1 else None, tuple(parts))


def lora_reference(x: Tensor, A: Tensor, B: Tensor, rows: Tensor) -> Tensor:
    """The adapter output, one row at a time.

    x [N, ..., d_in], A [S, d_in, r], B [S, r, d_out], rows [N] slot indices -> [N, ..., d_out].
    """
    out = [x[i] @ A[s] @ B[s] for i, s in enumerate(rows.tolist())]
    return torch.stack(out)


def add_lora(base_out: Tensor, x: Tensor, A: Tensor, B: Tensor, plan: SlotPlan) -> Tensor:
    """base_out + each row's adapter output, by the cheapest path the plan allows.

    base_out [N, ..., d_out] is the frozen layer's (contiguous, freshly computed) output for x [N, ..., d_in];
    the adapter output is added into it in place (fused into the last matmul). Rows without an adapter
    keep their values exactly.
    """
    if plan.uniform == 0:
        return base_out
    if plan.uniform is None and plan.parts is not None:  # part by part, each gathering its rows' adapters
        x2, out2, start = x.reshape(-1, x.shape[-1]), base_out.view(-1, base_out.shape[-1]), 0
        for length, part in plan.parts:
            end = start + part.rows.numel() * length
            add_lora(out2[start:end], x2[start:end], A, B, part)
            start = end
        return base_out
    n = plan.rows.numel()
    if plan.uniform is not None:
        s = plan.uniform
        x2 = x.reshape(-1, x.shape[-1])                                             # [N*L, d_in]
        base_out.view(x2.shape[0], -1).addmm_(x2 @ A[s], B[s])
        return base_out
    low = torch.bmm(x.reshape(n, -1, x.shape[-1]), A.index_select(0, plan.rows))   # [N, L, r]
    base_out.view(n, -1, base_out.shape[-1]).baddbmm_(low, B.index_select(0, plan.rows))
    return base_out
