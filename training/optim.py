"""The optimizer's parameter groups and the learning-rate schedule.

Routing logits get their own learning rate and no weight decay (the paper trains them 100x faster than
the skills, and decaying logits would pull every router back towards the uniform mixture).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import TrainConfig


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The trainable parameters of `model` split into routing logits and adapter weights (empty groups left out)."""
    logits, adapters = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (logits if name.endswith("router.logits") else adapters).append(p)
    groups = [
        {"name": "logits", "params": logits, "lr": config.logits_lr, "weight_decay": 0.0},
        {"name": "adapters", "params": adapters, "lr": config.lr, "weight_decay": config.weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Linear warmup from 1/(warmup+1) to 1 over `warmup_steps`, then constant, or linear / cosine decay
    reaching 0 after `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer,
                                                                    torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups`, with the schedule of `config` applied to every group."""
    optimizer = torch.optim.AdamW(param_groups(model, config))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, config.steps, config.schedule))
    return optimizer, scheduler
