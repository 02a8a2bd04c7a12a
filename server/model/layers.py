"""The serving backbone: a causal LM whose target linears read their adapter from per-row slots.

Owns wrapping the target nn.Linear modules (`BatchedLoRALinear`), the slot weight storage they hold
(`SlotWeights`) and the `SlotContext` the engine sets before every forward, and the layout of the frozen
weights on CPU (`PanelLinear` for the compiled op, else `column_major_weights`). Linears of one shape share
one stacked buffer (each layer holds a view of its part), so writing an adapter into a slot is a few
copies per shape group, not several per layer. Which adapter goes into which slot is `server.engine.slots`'s
business, the adapters themselves `server.engine.inventory`'s, the KV cache `server.engine.kv_cache`'s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhr import FrozenLinear
from mhr.layer import linear_features
from server.model.lora_ops import SlotPlan, add_lora

# One adapter in slot layout: per shape group, A [G, d_in, r] and B [G, r, d_out] with the scaling in B.
GroupedLoRA = list[tuple[Tensor, Tensor]]


class SlotWriter(Protocol):
    """An adapter that stores itself into slots, e.g. mixed from the skills straight into slot storage."""

    rank: int

    @staticmethod
    def write_all(items: list[tuple[GroupedLoRA, SlotWriter]]) -> None:
        """Each adapter into its slot's `views`: per shape group A [G, d_in, rank] and B [G, rank, d_out]
        (strided views). Called once for all adapters of one class written together."""


def copy_into(views: GroupedLoRA, adapter: GroupedLoRA) -> None:
    """Copy `adapter`'s tensors into a slot's `views` (as `SlotWriter.write_all` receives them)."""
    for (A_view, B_view), (A, B) in zip(views, adapter, strict=True):
        A_view.copy_(A)
        B_view.copy_(B)


class SlotContext:
    """The slot plan of the current forward, shared by every layer of one model.

    Layers see slot indices only, never task names: the engine translates requests to slots.
    """

    def __init__(self) -> None:
        self.plan: SlotPlan | None = None

    def current(self) -> SlotPlan:
        if self.plan is None:
            raise RuntimeError("no slot plan set: the engine sets one before each forward")
        return self.plan


class BatchedLoRALinear(nn.Module):
    """y = base(x) + x @ A[slot(row)] @ B[slot(row)] for the frozen nn.Linear (or transformers Conv1D) `base`.

    Buffers (views into the shape group's storage, in the base layer's dtype and device):
    lora_A [S, d_in, r_max], lora_B [S, r_max, d_out] (see `server.model.lora_ops`).
    Slot 0 is zero and never written (the "no adapter" slot). When `base` is a `PanelLinear` (CPU, float32
    or bfloat16, with the compiled kernels) one call of its op computes both terms; else
    `server.model.lora_ops.add_lora` adds the adapters to the base layer's output.
    """

    def __init__(self, base: nn.Linear, lora_A: Tensor, lora_B: Tensor, context: SlotContext) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.register_buffer("lora_A", lora_A, persistent=False)
        self.register_buffer("lora_B", lora_B, persistent=False)
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        plan = self.context.current()
        if isinstance(self.base, PanelLinear):
            return self.base(x) if plan.uniform == 0 else self.base(x, self.lora_A, self.lora_B, plan.rows)
        return add_lora(self.base(x), x, self.lora_A, self.lora_B, plan)

    def extra_repr(self) -> str:
        S, _, r = self.lora_A.shape
        return f"slots={S}, max_rank={r}"


@dataclass
class SlotGroup:
    """The slot storage of all adapted linears of one shape, in `names` order."""

    names: list[str]
    A: Tensor  # [G, S, d_in, r_max]
    B: Tensor  # [G, S, r_max, d_out]


class SlotWeights:
    """The slot storage of a whole model, grouped by linear shape."""

    def __init__(self, groups: list[SlotGroup], layers: dict[str, BatchedLoRALinear]) -> None:
        self.groups, self.layers = groups, layers
        _, self.n_slots, _, self.max_rank = groups[0].A.shape
        self._views: dict[tuple[int, int], GroupedLoRA] = {}  # (slot, rank) -> its views, made once
        self._zero_from = [self.max_rank] * self.n_slots       # per slot: its ranks from here on are zeros

    def write(self, slot: int, adapter: GroupedLoRA | SlotWriter) -> None:
        """Put an adapter into `slot` of every layer; ranks below r_max are zero-padded (exact zeros)."""
        self.write_many([(slot, adapter)])

    def write_many(self, items: list[tuple[int, GroupedLoRA | SlotWriter]]) -> None:
        """Put adapters into their (distinct) slots of every layer, as `write`. Adapters that write themselves
        are handed to their class together (`SlotWriter.write_all`): routed tasks mix in one pass over the
        skills. Every item is checked before any slot is touched."""
        ranks = [adapter[0][0].shape[-1] if isinstance(adapter, list) else adapter.rank for _, adapter in items]
        for (slot, _), rank in zip(items, ranks, strict=True):
            if not 0 < slot < self.n_slots:
                raise ValueError(f"slot {slot} is not a writable slot (1..{self.n_slots - 1})")
            if rank > self.max_rank:
                raise ValueError(f"adapter rank {rank} exceeds the slots' max rank {self.max_rank}")
        if len({slot for slot, _ in items}) < len(items):
            raise ValueError(f"two adapters for one slot: {[slot for slot, _ in items]}")
        writers: dict[type, list[tuple[GroupedLoRA, SlotWriter]]] = {}
        with torch.no_grad():
            for (slot, adapter), rank in zip(items, ranks, strict=True):
                views = self._views.get((slot, rank))
                if views is None:
                    views = self._views[slot, rank] = [(g.A[:, slot, :, :rank], g.B[:, slot, :rank])
                                                       for g in self.groups]
                end = self._zero_from[slot]
                if rank < end:  # ranks of what the slot held before, above this adapter's: zero them
                    for group in self.groups:
                        group.A[:, slot, :, rank:end].zero_()
                        group.B[:, slot, rank:end].zero_()
                self._zero_from[slot] = rank
                if isinstance(adapter, list):
                    copy_into(views, adapter)
                else:
                    writers.setdefault(type(adapter), []).append((views, adapter))
            for kind, group in writers.items():
                kind.write_all(group)

    def resize(self, n_slots: int) -> None:
        """Hold `n_slots` slots per layer from now on: the slots below both sizes keep their adapters, new ones
        are empty, and every layer reads the new storage (the old is freed). All of it is allocated before
        anything changes, so a failed allocation leaves the slots as they were."""
        keep = min(n_slots, self.n_slots)
        new = []
        for group in self.groups:
            A = group.A.new_zeros(group.A.shape[0], n_slots, *group.A.shape[2:])
            B = group.B.new_zeros(group.B.shape[0], n_slots, *group.B.shape[2:])
            new.append((A, B))
        with torch.no_grad():
            for group, (A, B) in zip(self.groups, new, strict=True):
                A[:, :keep], B[:, :keep] = group.A[:, :keep], group.B[:, :keep]
                group.A, group.B = A, B
                for i, name in enumerate(group.names):
                    self.layers[name].lora_A, self.layers[name].lora_B = A[i], B[i]
        self._views.clear()
        self._zero_from = self._zero_from[:keep] + [0] * (n_slots - keep)
        self.n_slots = n_slots

    def clear(self, slot: int) -> None:
        with torch.no_grad():
            for group in self.groups:
                group.A[:, slot].zero_()
                group.B[:, slot].zero_()
        self._zero_from[slot] = 0


def column_major_weights(model: nn.Module) -> None:
    """Store every nn.Linear weight of `model` transposed in memory, its values and shape unchanged.

    `F.linear` multiplies by `weight.T`; stored this way that operand is a plain contiguous matrix, which
    CPU BLAS multiplies 1.5-5x faster at decode batch sizes (2-56 rows) than the default layout, and
    about as fast for large batches (docs/engine.md). Tied weights are moved once (they are one tensor).
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.t().contiguous().t()


PANEL = 32  # output columns per panel: the layout the compiled `panel_linear` op reads
PANEL_DTYPES = (torch.float32, torch.bfloat16)  # what it computes in


class PanelLinear(FrozenLinear):
    """A frozen nn.Linear (CPU, float32 or bfloat16) computed by the compiled `panel_linear` op
    (`server.model.cpu_kernel`; float32 sums, bfloat16 outputs rounded once per term).

    The weight is stored once as column panels, `panels` [ceil(N / 32), K, 32]: panel p holds output
    columns 32p..32p+31 of every input dimension, contiguous (zeros past N), so that the op reads each
    panel as one stream; the bias, if any, is padded to the panels' width. Same values, other layout.
    Called with slot tensors (as `BatchedLoRALinear` holds them) and the rows' slots, the same pass adds
    each row's adapter: x @ W^T + b + x @ A[slot] @ B[slot], rows of slot 0 getting exactly x @ W^T + b.
    Called without them on an x that requires grad (an adaptation job's forward), it is differentiable in x.
    """

    def __init__(self, linear: nn.Linear, op: Callable) -> None:
        super().__init__()
        self.in_features, self.out_features, self.op = linear.in_features, linear.out_features, op
        n_panels = -(-self.out_features // PANEL)
        pad = n_panels * PANEL - self.out_features  # the last panel's missing columns are zeros
        weight = F.pad(linear.weight.detach(), (0, 0, 0, pad))
        bias = F.pad(linear.bias.detach(), (0, pad)) if linear.bias is not None else weight.new_zeros(0)
        self.register_buffer("panels", weight.view(n_panels, PANEL, -1).transpose(1, 2).contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor, A: Tensor | None = None, B: Tensor | None = None,
                slots: Tensor | None = None) -> Tensor:
        """x [N, ..., K] -> [N, ..., out_features]; with A [S, K, r], B [S, r, out_features] and slots [N]
        (all or none), row n's tokens also get the adapter of slot slots[n]."""
        if A is None and x.requires_grad and torch.is_grad_enabled():
            return _PanelMatmul.apply(x, self)
        rows = x.reshape(-1, self.in_features).contiguous()
        out = rows.new_empty(rows.shape[0], self.out_features)
        self.op(out, rows, self.panels, self.bias, A, B, slots)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias.numel() > 0}"


    def weight(self) -> Tensor:
        """The weight in nn.Linear's layout [out_features, in_features] (a copy)."""
        n_panels, K, _ = self.panels.shape
        return self.panels.transpose(1, 2).reshape(n_panels * PANEL, K)[:self.out_features]


class _PanelMatmul(torch.autograd.Function):
    """A `PanelLinear` as an autograd op in its input: the forward is the compiled op; the backward,
    grad_x = grad_y @ W, unpacks the layer's weight for the duration of the call (one layer at a time)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: PanelLinear) -> Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return layer(x.detach())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.layer.weight(), None


def panel_linears(model: nn.Module, op: Callable) -> int:
    """Replace, in place, every float32 or bfloat16 CPU nn.Linear of `model` (adapted layers' bases
    included) by a `PanelLinear`; returns how many. A weight the model shares with another module (tied
    embeddings) is left as it is, since the other module reads it in the usual layout."""
    names_of = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and m.weight.dtype in PANEL_DTYPES and m.weight.device.type == "cpu"
             and names_of[id(m.weight)] == 1]
    for name in names:  # one at a time: each original weight is freed once its panels exist
        model.set_submodule(name, PanelLinear(model.get_submodule(name), op))
    return len(names)


def wrap_model(model: nn.Module, module_names: list[str], n_slots: int,
               max_rank: int) -> tuple[SlotContext, SlotWeights]:
    """Replace, in place, the named nn.Linear (or transformers Conv1D) modules of `model` by BatchedLoRALinear
    layers.

    Returns the context the engine sets per forward and the slot storage the adapter cache writes.
    """
    if n_slots < 2:
        raise ValueError(f"n_slots must be >= 2 (slot 0 is the empty adapter), got {n_slots}")
    by_shape: dict[tuple, list[str]] = {}
    for name in module_names:
        linear = model.get_submodule(name)
        features = linear_features(linear)
        if features is None or isinstance(linear, FrozenLinear):  # the slots take the weight's dtype and device
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear or Conv1D: cannot adapt it")
        key = (*features, linear.weight.dtype, linear.weight.device)
        by_shape.setdefault(key, []).append(name)
    context, groups, layers = SlotContext(), [], {}
    for (d_in, d_out, dtype, device), names in by_shape.items():
        kwargs = dict(dtype=dtype, device=device)
        group = SlotGroup(names, torch.zeros(len(names), n_slots, d_in, max_rank, **kwargs),
                          torch.zeros(len(names), n_slots, max_rank, d_out, **kwargs))
        for i, name in enumerate(names):
            layers[name] = BatchedLoRALinear(model.get_submodule(name), group.A[i], group.B[i], context)
            model.set_submodule(name, layers[name])
        groups.append(group)
    return context, SlotWeights(groups, layers)
