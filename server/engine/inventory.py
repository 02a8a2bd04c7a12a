"""Adapters in slot layout: routed tasks mixed straight from the skill inventory, dense LoRAs regrouped.

Owns the serving copy of a bundle's skill inventory, resident on the device and laid out per shape group
(the groups of `server.model.layers.SlotWeights`) as [G, h, K, block] (block: one head's d/h x r slice), so that
mixing a task is one pass over K contiguous streams per head: the compiled `mix_skills` op writes the sum
straight into the slot (CPU float32 or bfloat16), else one batched matmul per group and side, [G*h, 1, K] @
[G*h, K, block], then a copy. A routed task is a `MixedLoRA` (its mixing weights) until it is written into
a slot. The math is `mhr.functional.mix_heads` (the compiled op is tested against it), with the LoRA scaling
folded into the B skills once, so that both sides mix with the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from mhr.adapter import LoRA
from mhr.bundle import Bundle
from mhr.functional import heads_first, join_heads, mix_heads, routing_weights, uniform_weights
from server.model.layers import GroupedLoRA, copy_into


class ServingInventory:
    """A bundle's skills, grouped as `groups` (lists of module names, one shape per list).

    Args:
        bundle: the bundle whose inventory (lora_A [K, h, d_in/h, r], lora_B [K, h, r, d_out/h]) to hold.
        groups: module names per shape group, in slot-storage order.
        device, dtype: where the skills live and tasks materialize.
        mix_op: the compiled `mix_skills` op (`server.model.cpu_kernel`, CPU float32 or bfloat16) or None for torch
            ops.
    """

    def __init__(self, bundle: Bundle, groups: list[list[str]], device: torch.device | str,
                 dtype: torch.dtype, mix_op: Callable | None = None) -> None:
        c = bundle.config
        self.groups, self.n_skills, self.n_heads, self.rank = groups, c.n_skills, c.n_heads, c.rank
        self.A_skills, self.B_skills = [], []
        for names in groups:
            A = heads_first(torch.stack([bundle.lora_A[n] for n in names]))       # [G, h, K, d_in/h, r]
            B = heads_first(torch.stack([bundle.lora_B[n] for n in names]))       # [G, h, K, r, d_out/h]
            self.A_skills.append(A.to(device, dtype).contiguous())
            self.B_skills.append((B * c.scaling).to(device, dtype).contiguous())  # mixes to a scaled B
        self.dims = [bundle.modules[names[0]] for names in groups]                 # (d_in, d_out) per group
        position = {name: i for i, name in enumerate(bundle.modules)}
        self._order = torch.tensor([position[n] for names in groups for n in names])  # module order -> groups
        self.device, self.dtype, self.mix_op = device, dtype, mix_op

    def routed(self, logits: Tensor) -> MixedLoRA:
        """A routed task's adapter from its logits [M, h, K] in the bundle's module order (`Bundle.routing_row`),
        with evaluation weights: a few small ops per task, not per module or per group."""
        return MixedLoRA(self, routing_weights(logits.index_select(0, self._order)))

    def weighted(self, weights: Mapping[str, Tensor]) -> MixedLoRA:
        """The adapter of mixing weights [h, K] per module (already normalised per head)."""
        return MixedLoRA(self, self._stacked(weights))

    def average(self) -> MixedLoRA:
        """The MHR-mu adapter: every head averages every skill (`mhr.functional.average_skills`)."""
        modules = sum(len(names) for names in self.groups)
        return MixedLoRA(self, uniform_weights(self.n_heads, self.n_skills).expand(modules, -1, -1))

    def dense(self, lora: LoRA) -> GroupedLoRA:
        """An ordinary LoRA regrouped, its scaling folded into B; modules it leaves out get zeros."""
        r, dtype, out = lora.rank, next(iter(lora.A.values())).dtype, []
        for names, (d_in, d_out) in zip(self.groups, self.dims, strict=True):
            A = torch.stack([lora.A.get(n, torch.zeros(d_in, r, dtype=dtype)) for n in names])   # [G, d_in, r]
            B = torch.stack([lora.B.get(n, torch.zeros(r, d_out, dtype=dtype)) for n in names])  # [G, r, d_out]
            out.append((A.to(self.device, self.dtype), (B * lora.scaling).to(self.device, self.dtype)))
        return out

    def _stacked(self, per_module: Mapping[str, Tensor]) -> Tensor:
        """[h, K] per module -> [M, h, K] in slot-group order."""
        return torch.stack([per_module[n] for names in self.groups for n in names])


class MixedLoRA:
    """A task's adapter as mixing weights over a `ServingInventory`'s skills, [M, h, K] in slot-group order.

    Both sides of a head mix with the same weights (the inventory's B skills carry the LoRA scaling).
    Written into slots by `SlotWeights.write_many` (which calls `write_all`); `tensors()` materializes it.
    """

    def __init__(self, inventory: ServingInventory, weights: Tensor) -> None:
        self.inventory, self.rank = inventory, inventory.rank
        w = weights.to(inventory.device, inventory.dtype).contiguous()
        self.weights = w.split([len(names) for names in inventory.groups])  # [G, h, K] per group

    def tensors(self) -> GroupedLoRA:
        """Per group A [G, d_in, r] (heads stacked along d_in) and B [G, r, d_out] scaled (heads along d_out)."""
        out = []
        for A_skills, B_skills, w in zip(self.inventory.A_skills, self.inventory.B_skills, self.weights, strict=True):
            w = w[:, None]                                                        # [G, 1 task, h, K]
            A, B = join_heads(mix_heads(w, A_skills), mix_heads(w, B_skills))     # [G, 1, d_in, r], [G, 1, r, d_out]
            out.append((A[:, 0], B[:, 0]))
        return out

    @staticmethod
    def write_all(items: list[tuple[GroupedLoRA, MixedLoRA]]) -> None:
        """Store each adapter in its slot's views, per group A [G, d_in, r] and B [G, r, d_out] (any strides).

        With the compiled op, one call mixes every adapter of an inventory: the inventory is read once for all
        of them (a burst of cold tasks costs one read plus their writes), and each adapter's sums are the same
        bits as when it is mixed alone. Torch ops mix one adapter at a time.
        """
        by_inventory: dict[int, list[tuple[GroupedLoRA, MixedLoRA]]] = {}
        for views, adapter in items:
            by_inventory.setdefault(id(adapter.inventory), []).append((views, adapter))
        for group in by_inventory.values():
            inv = group[0][1].inventory
            if inv.mix_op is None:
                for views, adapter in group:
                    copy_into(views, adapter.tensors())
                continue
            outs, skills, weights = [], [], []  # per source (a group's A or B skills): every adapter's out and w
            for g, (A_skills, B_skills) in enumerate(zip(inv.A_skills, inv.B_skills, strict=True)):
                G, h, K, _, r = A_skills.shape
                outs += [views[g][0].view(G, h, -1, r) for views, _ in group]                   # per head: rows
                outs += [views[g][1].view(G, r, h, -1).transpose(1, 2) for views, _ in group]   # per head: columns
                skills += [A_skills, B_skills]
                weights += [adapter.weights[g] for _, adapter in group] * 2
            inv.mix_op(outs, skills, weights)
