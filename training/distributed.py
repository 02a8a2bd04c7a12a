"""Data parallelism over processes started by `torchrun`: the process group and the gradient exchange.

Every process holds the whole model and takes its share of each global batch (`TaskBatches` does the
split). After the micro-batches of a step, one all-reduce sums the adapter gradients (the loss is already
normalised by the target tokens of the global batch), so every process applies the same update as one
process with the whole batch would. Adapters are small, so this explicit exchange replaces DDP's
bucketed, overlapped one without cost, and keeps the model unwrapped for `mhr` (no `.module`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that writes files and shows progress."""
        return self.rank == 0


SINGLE = World()  # the world of a run without torchrun


def setup() -> World:
    """Join the process group when started by torchrun; else one process.

    gloo: the training package keeps models on the CPU for now (an nccl group needs them on the GPU).
    """
    if not dist.is_torchelastic_launched():
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size())


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def sum_over(world: World, value: float) -> float:
    """The sum of `value` over all processes."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def broadcast_parameters(world: World, params: Sequence[nn.Parameter]) -> None:
    """Give every process rank 0's values (adapter initialisation must not differ between processes)."""
    if world.size == 1:
        return
    for p in params:
        dist.broadcast(p.data, src=0)


def sum_gradients(world: World, params: Sequence[nn.Parameter], loss: float) -> float:
    """Sum the gradients of `params` over processes in one collective; returns the summed loss."""
    if world.size == 1:
        return loss
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([loss], dtype=grads[0].dtype)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()
    return float(flat[-1])
