"""Collapse a skill inventory and routing weights into ordinary LoRAs, many modules and tasks per einsum."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mhr.adapter import LoRA
from mhr.functional import heads_first, join_heads, mix_heads, routing_weights, uniform_weights
from mhr.inject import mhr_layers


class SkillInventory:
    """The K skills of every adapted module, kept on one device and stacked by shape.

    Modules of equal shape (all q/k/v/o projections of a model, say) share one stacked tensor, so
    materializing a task costs one einsum per distinct shape rather than one per module.

    Args:
        lora_A: per module [K, h, d_in/h, r].
        lora_B: per module [K, h, r, d_out/h].
        alpha: the inventory's LoRA alpha (scaling = alpha / r).
    """

    def __init__(self, lora_A: Mapping[str, Tensor], lora_B: Mapping[str, Tensor], alpha: float,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if lora_A.keys() != lora_B.keys() or not lora_A:
            raise ValueError("lora_A and lora_B must name the same, non-empty set of modules")
        self.alpha = alpha
        self.modules = list(lora_A)
        groups: dict[tuple, list[str]] = {}
        for name in self.modules:
            groups.setdefault((tuple(lora_A[name].shape), tuple(lora_B[name].shape)), []).append(name)
        shapes = {key[0][:2] + key[0][3:] for key in groups}  # (K, h, r) of every module
        if len(shapes) != 1:
            raise ValueError(f"every module needs the same (K, h, r); found {sorted(shapes)}")
        self.n_skills, self.n_heads, self.rank = shapes.pop()
        # Stored heads first, [G, h, K, x, y]: mixing (`mix_heads`) is then one batched matmul over (module, head)
        # that reads the skills in place, instead of permuting them per call.
        self._groups = [(names, self._stacked(lora_A, names, device, dtype),
                         self._stacked(lora_B, names, device, dtype)) for names in groups.values()]

    @staticmethod
    def _stacked(tensors: Mapping[str, Tensor], names: list[str], device, dtype) -> Tensor:
        stacked = torch.stack([tensors[n] for n in names]).to(device=device, dtype=dtype)  # [G, K, h, x, y]
        return heads_first(stacked).contiguous()                                            # [G, h, K, x, y]

    @classmethod
    def from_model(cls, model: nn.Module) -> SkillInventory:
        """The inventory held by a model's MHR layers."""
        layers = mhr_layers(model)
        if not layers:
            raise ValueError("model holds no MHR layers: call mhr.inject(model, config, n_tasks) first")
        alpha = layers[next(iter(layers))].alpha
        return cls({n: layer.lora_A.detach() for n, layer in layers.items()},
                   {n: layer.lora_B.detach() for n, layer in layers.items()}, alpha)

    @property
    def device(self) -> torch.device:
        return self._groups[0][1].device

    @property
    def dtype(self) -> torch.dtype:
        return self._groups[0][1].dtype

    def tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per-module (lora_A [K, h, d_in/h, r], lora_B [K, h, r, d_out/h]), views into the stored skills."""
        A, B = {}, {}
        for names, A_hk, B_hk in self._groups:
            A_view, B_view = A_hk.transpose(1, 2), B_hk.transpose(1, 2)  # [G, K, h, d_in/h, r], [G, K, h, r, d_out/h]
            for i, name in enumerate(names):
                A[name], B[name] = A_view[i], B_view[i]
        return {n: A[n] for n in self.modules}, {n: B[n] for n in self.modules}

    def materialize(self, weights: Mapping[str, Tensor] | Tensor) -> LoRA:
        """The LoRA(s) of mixing weights.

        Args:
            weights: per module [*T, h, K], or one tensor [*T, h, K] used for every module (a custom
                mixture). Routing *weights*, not logits: see `materialize_logits`. An optional leading
                task dim T materializes T tasks at once: the result's tensors are [T, d_in, r] and
                [T, r, d_out]; without it, [d_in, r] and [r, d_out].
        """
        A, B = {}, {}
        for names, A_hk, B_hk in self._groups:
            if isinstance(weights, Tensor):
                w = weights.to(self.device).expand(len(names), *weights.shape)
            else:
                missing = [n for n in names if n not in weights]
                if missing:
                    raise KeyError(f"no routing weights for module(s) {missing}")
                w = torch.stack([weights[n] for n in names]).to(self.device)
            self._check_weights(w)
            single = w.dim() == 3
            w = w[:, None] if single else w                                          # [G, T, h, K]
            A_t, B_t = join_heads(mix_heads(w, A_hk), mix_heads(w, B_hk))           # [G, T, d_in, r], [G, T, r, d_out]
            for i, name in enumerate(names):
                A[name], B[name] = (A_t[i, 0], B_t[i, 0]) if single else (A_t[i], B_t[i])
        return LoRA({n: A[n] for n in self.modules}, {n: B[n] for n in self.modules}, self.alpha)

    def materialize_logits(self, logits: Mapping[str, Tensor] | Tensor) -> LoRA:
        """`materialize` of routing logits, turned into weights as at evaluation (sigmoid, normalised)."""
        if isinstance(logits, Tensor):
            return self.materialize(routing_weights(logits))
        return self.materialize({n: routing_weights(t) for n, t in logits.items()})

    def average(self) -> LoRA:
        """The MHR-mu adapter: per module the uniform mixture of the skills (`mhr.functional.average_skills`)."""
        return self.materialize(uniform_weights(self.n_heads, self.n_skills))

    def _check_weights(self, w: Tensor) -> None:
        if w.dim() not in (3, 4) or tuple(w.shape[-2:]) != (self.n_heads, self.n_skills):
            raise ValueError(f"mixing weights must be [h={self.n_heads}, K={self.n_skills}] or "
                             f"[T, {self.n_heads}, {self.n_skills}], got {tuple(w.shape[1:])}")
