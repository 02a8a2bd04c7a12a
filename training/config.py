"""TrainConfig: every setting of a training run (method, adapter shape, optimization, checkpoints).

Validated on construction, listing every problem at once. Which methods a command accepts is checked
by the command (`require_method`); the adapter's own shape is `mhr.MHRConfig`, derived here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mhr import MHRConfig
from mhr.adapter import scale_problem

PRETRAIN_METHODS = ("lora", "poly", "mhr")
ADAPT_METHODS = ("lora", "poly", "mhr", "mhr-z", "mhr-mu")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("fp32", "bf16")
DEVICE_TYPES = ("cpu", "cuda", "mps")


class TrainConfigError(ValueError):
    """An invalid TrainConfig; the message lists every problem found, one per line."""


@dataclass
class TrainConfig:
    """Settings of one run. Paper defaults where the paper has one (its mttl configs).

    Args:
        method: pre-training "lora" (one shared LoRA), "poly" (h = 1) or "mhr"; adaptation also "mhr-z"
            (routing only) and "mhr-mu" (the skills' average as one LoRA).
        skills, heads, rank, alpha, dropout, target_modules, relaxed_routing: the inventory (pre-training
            only, see MHRConfig). `heads` applies to "mhr"; "poly" uses 1 head and "lora" 1 skill with 1 head.
        lr: learning rate of adapter weights. logits_lr: of routing logits (the paper: 0.1 vs 1e-3).
        steps: optimizer steps. batch_size: examples per micro-batch (per process). grad_accum: micro-batches
            per step. warmup_steps, schedule: linear warmup, then constant / linear / cosine decay to 0.
        weight_decay: AdamW decay of adapter weights (never of logits). max_grad_norm: clipping (0 = off).
        dtype: "fp32", or "bf16" autocast (adapter weights and optimizer stay fp32).
        device: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N" or "mps"; under torchrun
            a CUDA device means one GPU per process (see `training.distributed.World.device`).
        max_length: tokens per example (prompt truncated from the left first).
        eval_every: steps between evaluations of the eval loss (0 = never). save_every: steps between
            checkpoints (0 = never), written under checkpoint_dir, from which a run resumes.
    """

    method: str = "mhr"
    skills: int = 8
    heads: int = 4
    rank: int = 4
    alpha: float = 1.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    relaxed_routing: bool = True
    lr: float = 1e-3
    logits_lr: float = 0.1
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "fp32"
    device: str = "auto"
    max_length: int = 256
    eval_every: int = 0
    save_every: int = 0
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        errors = []
        if self.method not in ADAPT_METHODS:
            errors.append(f"method must be one of {', '.join(ADAPT_METHODS)}, got {self.method!r}")
        for name in ("skills", "heads", "rank", "steps", "batch_size", "grad_accum", "max_length"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                errors.append(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "seed", "eval_every", "save_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                errors.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "logits_lr", "alpha"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                errors.append(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "max_grad_norm"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                errors.append(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            errors.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.dtype not in DTYPES:
            errors.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if problem := device_error(self.device):
            errors.append(problem)
        if self.save_every and not self.checkpoint_dir:
            errors.append("save_every > 0 needs a checkpoint_dir")
        if not errors:
            try:
                inventory = self.mhr_config()
            except ValueError as e:
                errors.append(str(e))
            else:  # checked now: the bundle refuses it, after the whole run, at save
                if problem := scale_problem(inventory.alpha, inventory.rank):
                    errors.append(f"alpha {problem}")
        if errors:
            raise TrainConfigError("invalid TrainConfig:\n  " + "\n  ".join(errors))

    def mhr_config(self) -> MHRConfig:
        """The inventory this run pre-trains. "lora" is K = 1, h = 1: one skill whose normalised routing
        weight is 1 for every task, i.e. exactly one shared LoRA, stored in the ordinary bundle layout
        (routing is then deterministic: a relaxed-Bernoulli gate could, rarely, switch the skill off)."""
        skills, heads = {"lora": (1, 1), "poly": (self.skills, 1)}.get(self.method, (self.skills, self.heads))
        return MHRConfig(n_skills=skills, n_heads=heads, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                         target_modules=self.target_modules,
                         relaxed_routing=self.relaxed_routing and self.method != "lora")

    @property
    def torch_device(self) -> torch.device:
        """The device of `device` on this machine ("auto" resolved)."""
        return resolve_device(self.device)

    def require_method(self, allowed: tuple[str, ...], command: str) -> None:
        if self.method not in allowed:
            raise TrainConfigError(f"{command} takes method {' / '.join(allowed)}, got {self.method!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise TrainConfigError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """A config from a JSON file, with `overrides` (e.g. from the command line) applied on top."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainConfigError(f"{path}: cannot read a JSON config ({e})") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: a config file must hold a JSON object")
        return cls.from_dict({**data, **overrides})


def device_error(name: Any) -> str | None:
    """Why `name` (a `device` setting) cannot be used on this machine, or None when it can."""
    if name == "auto":
        return None
    try:
        device = torch.device(name) if isinstance(name, str) else None
    except RuntimeError:  # not a device string
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        return f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"device {name!r}: CUDA is not available here (torch {torch.__version__}); use cpu or auto"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"device {name!r}: MPS is not available here"
    return None


def resolve_device(name: str) -> torch.device:
    """The torch device of a `device` setting: "auto" is CUDA when available, else the CPU.

    Raises TrainConfigError when the device is unknown or not available here.
    """
    if problem := device_error(name):
        raise TrainConfigError(problem)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
