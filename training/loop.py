"""The training loop shared by every method: pre-training, few-shot adaptation and zero-shot MHR-mu.

What a method trains is decided before the loop (which parameters require grad, see `training.model`);
the loop only optimizes them: micro-batches -> loss on target tokens -> AdamW step with clipping and the
schedule, resuming from and writing checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import mhr
from training import checkpoint
from training.config import TrainConfig
from training.data import IGNORE, TaskBatches, n_targets
from training.distributed import SINGLE, World, broadcast_parameters, sum_gradients, sum_over
from training.model import model_device
from training.optim import build_optimizer

EVAL_BATCHES = 4  # micro-batches behind each eval loss: a cheap, fixed sample of the eval data


@dataclass
class TrainResult:
    steps: int                                   # optimizer steps done in total (resumed ones included)
    losses: list[float] = field(default_factory=list)           # per step run in this call
    eval_losses: dict[int, float] = field(default_factory=dict)  # step -> mean eval loss

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last (up to) 10 steps: one step's loss is too noisy to report."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else None

    def summary(self) -> str:
        loss = "no step run (resumed from the last checkpoint)" if self.final_loss is None \
            else f"final loss {self.final_loss:.4f}"
        return f"{self.steps} steps, {loss}"


def on_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The batch's tensors on `device` (those already there are not copied)."""
    return {k: v.to(device) for k, v in batch.items()}


def target_nll(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-example summed cross-entropy [B] on the target tokens (labels != IGNORE, aligned with the outputs),
    on the model's device (the batch is moved there)."""
    batch = on_device(batch, model_device(model))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model.config.is_encoder_decoder:  # the decoder reads the labels shifted right
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    logits = model(**inputs).logits.float()  # [B, L, V]: output i predicts labels[i]
    nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE, reduction="none")
    return nll.sum(dim=-1)


def run_metadata(config: TrainConfig, data: str, n_examples: int, result: TrainResult) -> dict:
    """What a bundle records about the run that produced (part of) it."""
    return {"method": config.method, "data": data, "examples": n_examples, "steps": result.steps,
            "final_loss": result.final_loss, "config": config.to_dict()}


def _forward_sum(model: nn.Module, batch: dict[str, Tensor], config: TrainConfig) -> Tensor:
    device = model_device(model)
    batch = on_device(batch, device)  # the task ids too: every MHR layer reads them on every forward
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bf16"), \
            mhr.use_tasks(model, batch["task_ids"]):
        return target_nll(model, batch).sum()


def train_step(model: nn.Module, data: TaskBatches, step: int, config: TrainConfig, world: World) -> float:
    """Accumulate this process's gradients of one optimizer step; returns its part of the loss per target token.

    The loss is normalised by the target tokens of the whole step (all micro-batches, all processes), not
    per micro-batch, so that accumulating k micro-batches, or summing over k processes, gives the gradient
    of one batch k times as large.
    """
    micro = [data[step * config.grad_accum + m] for m in range(config.grad_accum)]
    n_tokens = sum_over(world, sum(n_targets(b) for b in micro), model_device(model))
    total = 0.0
    for batch in micro:
        loss = _forward_sum(model, batch, config) / n_tokens
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def eval_loss(model: nn.Module, data: TaskBatches, n_batches: int, config: TrainConfig) -> float:
    """Mean target-token loss over the first `n_batches` micro-batches of `data`, in eval mode."""
    was_training = model.training
    model.eval()
    losses, tokens = 0.0, 0
    for n in range(n_batches):
        batch = data[n]
        losses += _forward_sum(model, batch, config).item()
        tokens += n_targets(batch)
    model.train(was_training)
    return losses / tokens


class Optimization:
    """An optimization of the parameters of `model` that require grad, one step at a time (`step`).

    Resumes from the latest checkpoint in `config.checkpoint_dir` when there is one. With several processes
    (`world`), `data` must be split by rank. `train` runs one to its end; an adaptation job on the server runs
    its steps between the engine's.
    """

    def __init__(self, model: nn.Module, data: TaskBatches, config: TrainConfig, world: World = SINGLE) -> None:
        self.model, self.data, self.config, self.world = model, data, config, world
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(model, config)
        start = 0
        found = checkpoint.latest(config.checkpoint_dir) if config.checkpoint_dir else None
        if found is not None:
            start = checkpoint.restore(found, model, self.optimizer, self.scheduler)
        broadcast_parameters(world, self.params)
        if world.rank:  # every process draws its own routing noise and dropout masks
            torch.manual_seed(config.seed + world.rank)
        self.result = TrainResult(steps=start)

    @property
    def done(self) -> bool:
        return self.result.steps >= self.config.steps

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[-1]

    def step(self) -> float:
        """One optimizer step (the model in training mode); returns its loss per target token."""
        step = self.result.steps
        loss = sum_gradients(self.world, self.params, train_step(self.model, self.data, step, self.config, self.world))
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}: lower the learning rate or use fp32")
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.result.losses.append(loss)
        self.result.steps = step + 1
        return loss


def train(model: nn.Module, data: TaskBatches, config: TrainConfig, *, eval_data: TaskBatches | None = None,
          progress: bool = True, world: World = SINGLE,
          after_step: Callable[[int], None] | None = None) -> TrainResult:
    """Optimize the parameters of `model` that require grad for `config.steps` steps (`Optimization`).

    `after_step(steps_done)` is called after every optimizer step (e.g. to evaluate and keep the best
    weights); it must leave the model in training mode.

    Leaves the model in eval mode. Seed the RNGs (`training.model.seed_everything`) before building the model
    for a reproducible run. With several processes (`world`), rank 0 saves the checkpoints.
    """
    run = Optimization(model, data, config, world)
    result = run.result
    model.train()
    bar = tqdm(range(result.steps, config.steps), initial=result.steps, total=config.steps,
               desc=f"train {config.method}", unit="step", dynamic_ncols=True,
               disable=not (progress and world.is_main))
    for _ in bar:
        loss = run.step()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.lr:.2e}")
        if eval_data is not None and config.eval_every and result.steps % config.eval_every == 0:
            result.eval_losses[result.steps] = eval_loss(model, eval_data, EVAL_BATCHES, config)
            bar.write(f"step {result.steps}: eval loss {result.eval_losses[result.steps]:.4f}")
        if config.save_every and result.steps % config.save_every == 0 and world.is_main:
            checkpoint.save(config.checkpoint_dir, result.steps, model, run.optimizer, run.scheduler)
        if after_step is not None:
            after_step(result.steps)
    model.eval()
    return result
