"""MHRLinear: a frozen linear layer plus a routed skill inventory, an MHR-mu average, or a dense LoRA."""

from __future__ import annotations

import enum
import itertools
import math
import sys

import torch
from torch import Tensor, nn

from mhr.config import MHRConfig
from mhr.functional import average_skills, lora_delta, mix_skills
from mhr.router import Router


class Mode(enum.Enum):
    """Which adapter an MHRLinear adds to its base layer."""

    ROUTED = "routed"    # per-example task ids -> routing weights -> mixture of skills (MHR, Poly, MHR-z)
    AVERAGE = "average"  # uniform mixture of the skills (MHR-mu), no routing
    DENSE = "dense"      # an ordinary LoRA held by the layer (fine-tuned MHR-mu, LoRA, a materialized task)


def expand_task_ids(task_ids: Tensor, n_rows: int) -> Tensor:
    """Per-row task ids [n_rows] from ids given per example.

    A 0-d tensor applies to every row. When the batch is a whole multiple of the ids (beam search,
    several samples per prompt: transformers repeats each example in place) every id is repeated.
    """
    if task_ids.dim() == 0:
        return task_ids.expand(n_rows)
    if task_ids.dim() != 1:
        raise ValueError(f"task ids must be a scalar or 1-D, got shape {tuple(task_ids.shape)}")
    n_ids = task_ids.shape[0]
    if n_ids == n_rows:
        return task_ids
    if n_ids and n_rows % n_ids == 0:
        return task_ids.repeat_interleave(n_rows // n_ids)
    raise ValueError(f"{n_ids} task id(s) for a batch of {n_rows} rows: give one id per example")


class FrozenLinear(nn.Module):
    """A frozen linear map y = x W^T + b held in a layout other than nn.Linear's (packed for a kernel, say).

    MHR layers wrap it as they wrap an nn.Linear: subclasses set `in_features` and `out_features`, hold
    their weights as parameters or buffers, and compute the map (differentiably in x where x requires grad).
    """

    in_features: int
    out_features: int


def conv1d_type() -> type | None:
    """transformers' `Conv1D` (GPT-2's linear layers: y = x @ W + b, W [in, out]) when transformers is loaded
    (a model holding one has loaded it), else None; mhr itself never imports transformers."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear layer MHR layers can wrap (an nn.Linear, a `FrozenLinear`, or a
    transformers `Conv1D`, whose weight is the transpose of an nn.Linear's), else None."""
    if isinstance(module, nn.Linear | FrozenLinear):
        return module.in_features, module.out_features
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return tuple(module.weight.shape)
    return None


class MHRLinear(nn.Module):
    """y = base(x) + scaling * x @ A @ B, where (A, B) is chosen by `mode`; `base` is a linear layer as
    `linear_features` defines them.

    Parameters: the inventory lora_A [K, h, d_in/h, r] and lora_B [K, h, r, d_out/h], the router's
    logits [T, h, K] and, once `load_dense` was called, dense_A [d_in, r] and dense_B [r, d_out].
    The base layer is frozen and never modified. Adapter parameters are float32 whatever the base dtype.
    """

    def __init__(self, base: nn.Module, config: MHRConfig, n_tasks: int) -> None:
        super().__init__()
        K, h, r = config.n_skills, config.n_heads, config.rank
        features = linear_features(base)
        if features is None:
            raise TypeError(f"a {type(base).__name__} is not a linear layer MHR can wrap "
                            "(an nn.Linear, an mhr.FrozenLinear or a transformers Conv1D)")
        self.in_features, self.out_features = d_in, d_out = features
        if d_in % h or d_out % h:
            raise ValueError(f"in_features={d_in} and out_features={d_out} must both be divisible by n_heads={h}")
        self.base = base.requires_grad_(False)
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        self.lora_A = nn.Parameter(torch.empty(K, h, d_in // h, r, device=device))
        self.lora_B = nn.Parameter(torch.zeros(K, h, r, d_out // h, device=device))
        self.router = Router(n_tasks, h, K, relaxed=config.relaxed_routing,
                             temperature=config.temperature).to(device)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling = config.scaling
        self.alpha = config.alpha
        self.dense_A: nn.Parameter | None = None
        self.dense_B: nn.Parameter | None = None
        self.dense_scaling = 0.0
        self.mode = Mode.ROUTED
        self.task_ids: Tensor | None = None  # set for a whole forward/generate by mhr.inject.use_tasks
        self._init_skills(config.init)

    def _init_skills(self, init: str) -> None:
        K, h, d, r = self.lora_A.shape
        with torch.no_grad():
            if init == "kaiming":
                # kaiming-uniform(a=sqrt(5)) of an [r, d] block has bound 1/sqrt(d): one block per head
                bound = 1.0 / math.sqrt(d)
            else:  # "mttl": the reference code's bound for the full input dim
                bound = 1.0 / math.sqrt(3 * d * h)
            self.lora_A.uniform_(-bound, bound)

    def load_dense(self, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """Hold a trainable ordinary LoRA (A [d_in, r], B [r, d_out]) and switch to Mode.DENSE."""
        if lora_A.shape[0] != self.in_features or lora_B.shape[1] != self.out_features \
                or lora_A.shape[1] != lora_B.shape[0]:
            raise ValueError(
                f"dense LoRA shapes A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} do not fit a "
                f"{self.in_features} -> {self.out_features} layer (need A [d_in, r], B [r, d_out])"
            )
        device = self.lora_A.device
        self.dense_A = nn.Parameter(lora_A.detach().to(device, torch.float32).clone())
        self.dense_B = nn.Parameter(lora_B.detach().to(device, torch.float32).clone())
        self.dense_scaling = float(scaling)
        self.mode = Mode.DENSE

    def load_average(self) -> None:
        """Start a dense LoRA from the MHR-mu average of the skills (MHR-mu fine-tuning, zero-shot MHR-mu)."""
        with torch.no_grad():
            A, B = average_skills(self.lora_A, self.lora_B)
        self.load_dense(A, B, self.scaling)

    def task_lora(self, task_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The routed tasks' LoRAs: task ids [N] -> A [N, d_in, r], B [N, r, d_out] (current train/eval mode)."""
        return mix_skills(self.router(task_ids), self.lora_A, self.lora_B)

    def _routed_lora(self, task_ids: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
        ids = expand_task_ids(task_ids.to(self.lora_A.device), n_rows)
        if self.training and self.router.relaxed:
            return self.task_lora(ids)  # one relaxed-Bernoulli sample per example, as the references do
        unique, inverse = torch.unique(ids, return_inverse=True)
        A, B = self.task_lora(unique)
        if unique.numel() == 1:
            return A[0], B[0]  # one LoRA for the whole batch: two plain matmuls
        return A[inverse], B[inverse]

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        out = self.base(x)
        if self.mode is Mode.DENSE:
            if self.dense_A is None:
                raise RuntimeError("Mode.DENSE without a dense LoRA: call load_dense or load_average first")
            A, B, scaling = self.dense_A, self.dense_B, self.dense_scaling
        elif self.mode is Mode.AVERAGE:
            (A, B), scaling = average_skills(self.lora_A, self.lora_B), self.scaling
        else:
            ids = task_ids if task_ids is not None else self.task_ids
            if ids is None:
                raise RuntimeError(
                    "MHRLinear in Mode.ROUTED needs task ids: run the model inside "
                    "`with mhr.use_tasks(model, task_ids):` or pass task_ids to the layer"
                )
            (A, B), scaling = self._routed_lora(ids, x.shape[0]), self.scaling
        return out + lora_delta(self.dropout(x), A, B, scaling).to(out.dtype)

    def dense_lora(self) -> tuple[Tensor, Tensor, float]:
        """The held dense LoRA (A [d_in, r], B [r, d_out], scaling), detached."""
        if self.dense_A is None:
            raise RuntimeError("this layer holds no dense LoRA")
        return self.dense_A.detach(), self.dense_B.detach(), self.dense_scaling

    def extra_repr(self) -> str:
        K, h, _, r = self.lora_A.shape
        return f"n_skills={K}, n_heads={h}, rank={r}, scaling={self.scaling:g}, mode={self.mode.value}"
