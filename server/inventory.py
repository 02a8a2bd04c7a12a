"""Adapters in slot layout: routed tasks mixed straight from the skill inventory, dense LoRAs regrouped.

Owns the serving copy of a bundle's skill inventory, resident on the device and laid out per shape group
(the groups of `server.model.SlotWeights`) with skills next to last, so that mixing a task is one batched
matmul per group and per side: [G*h, 1, K] @ [G*h, K, d/h * r]. Nothing is permuted or copied at
materialization time except the result. The math is DESIGN.md section 1 (as `mhr.functional`), with the
LoRA scaling folded into B's mixing weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mhr.adapter import LoRA
from mhr.bundle import Bundle
from mhr.functional import routing_weights
from server.model import GroupedLoRA


class ServingInventory:
    """A bundle's skills, grouped as `groups` (lists of module names, one shape per list).

    Args:
        bundle: the bundle whose inventory (lora_A [K, h, d_in/h, r], lora_B [K, h, r, d_out/h]) to hold.
        groups: module names per shape group, in slot-storage order.
        device, dtype: where the skills live and tasks materialize.
    """

    def __init__(self, bundle: Bundle, groups: list[list[str]], device: torch.device | str,
                 dtype: torch.dtype) -> None:
        c = bundle.config
        self.groups, self.n_skills, self.n_heads, self.scaling = groups, c.n_skills, c.n_heads, c.scaling
        self._A, self._B = [], []
        for names in groups:
            A = torch.stack([bundle.lora_A[n] for n in names]).transpose(1, 2)    # [G, h, K, d_in/h, r]
            B = torch.stack([bundle.lora_B[n] for n in names]).transpose(1, 2)    # [G, h, K, r, d_out/h]
            G, h, K = A.shape[:3]
            self._A.append(A.reshape(G * h, K, -1).to(device, dtype).contiguous())  # [G*h, K, d_in/h * r]
            self._B.append(B.reshape(G * h, K, -1).to(device, dtype).contiguous())  # [G*h, K, r * d_out/h]
        self.dims = [bundle.modules[names[0]] for names in groups]                 # (d_in, d_out) per group
        self.rank, self.device, self.dtype = c.rank, device, dtype

    def routed(self, logits: Mapping[str, Tensor]) -> GroupedLoRA:
        """A routed task's adapter from its logits [h, K] per module (evaluation weights).

        The weights of all modules are computed at once on their stacked logits [M, h, K], then split
        per shape group: a few small ops per task, not per module or per group.
        """
        stacked = torch.stack([logits[n] for names in self.groups for n in names]).to(self.device)
        weights = routing_weights(stacked).split([len(names) for names in self.groups])
        return [self._mix(w, i) for i, w in enumerate(weights)]

    def weighted(self, weights: Mapping[str, Tensor]) -> GroupedLoRA:
        """The adapter of mixing weights [h, K] per module (already normalised per head)."""
        return [self._mix(torch.stack([weights[n] for n in names]).to(self.device), i)
                for i, names in enumerate(self.groups)]

    def average(self) -> GroupedLoRA:
        """The MHR-mu adapter: every head averages every skill."""
        uniform = torch.full((self.n_heads, self.n_skills), 1.0 / self.n_skills, device=self.device)
        return [self._mix(uniform.expand(len(names), -1, -1), i) for i, names in enumerate(self.groups)]

    def dense(self, lora: LoRA) -> GroupedLoRA:
        """An ordinary LoRA regrouped, its scaling folded into B; modules it leaves out get zeros."""
        r, dtype, out = lora.rank, next(iter(lora.A.values())).dtype, []
        for names, (d_in, d_out) in zip(self.groups, self.dims, strict=True):
            A = torch.stack([lora.A.get(n, torch.zeros(d_in, r, dtype=dtype)) for n in names])   # [G, d_in, r]
            B = torch.stack([lora.B.get(n, torch.zeros(r, d_out, dtype=dtype)) for n in names])  # [G, r, d_out]
            out.append((A.to(self.device, self.dtype), (B * lora.scaling).to(self.device, self.dtype)))
        return out

    def _mix(self, weights: Tensor, group: int) -> tuple[Tensor, Tensor]:
        """Mixing weights [G, h, K] -> (A [G, d_in, r], B [G, r, d_out] scaled)."""
        G, h, K = weights.shape
        w = weights.to(self.dtype).reshape(G * h, 1, K)
        A = torch.bmm(w, self._A[group]).reshape(G, -1, self.rank)                 # heads stacked along d_in
        B = torch.bmm(w * self.scaling, self._B[group]).reshape(G, h, self.rank, -1)  # [G, h, r, d_out/h]
        return A, B.transpose(1, 2).reshape(G, self.rank, -1)                      # heads along d_out

