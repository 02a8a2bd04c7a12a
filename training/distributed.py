"""Data parallelism over processes started by `torchrun`: the process group and the gradient exchange.

Every process holds the whole model and takes its share of each global batch (`TaskBatches` does the
split). After the micro-batches of a step, one all-reduce sums the adapter gradients (the loss is already
normalised by the target tokens of the global batch), so every process applies the same update as one
process with the whole batch would. Adapters are small, so this explicit exchange replaces DDP's
bucketed, overlapped one without cost, and keeps the model unwrapped for `mhr` (no `.module`).
On CUDA each process holds its own GPU and the group uses nccl; on the CPU, gloo.
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
    local_rank: int | None = None  # the process's index on its machine under torchrun; None without it

    @property
    def is_main(self) -> bool:
        """The process that writes files and shows progress."""
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The device this process runs on: under torchrun a CUDA device means one GPU per process,
        cuda:{local_rank} (an index given with it is ignored); otherwise `requested` itself."""
        if requested.type == "cuda" and self.local_rank is not None:
            return torch.device("cuda", self.local_rank)
        return requested


SINGLE = World()  # the world of a run without torchrun


def backend(device: torch.device) -> str:
    """The process group backend for models on `device`: nccl reduces GPU tensors, gloo CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: torch.device) -> World:
    """Join the process group when started by torchrun (with the backend `device` needs); else one process."""
    if not dist.is_torchelastic_launched():
        return SINGLE
    local_rank = dist.get_node_local_rank()  # torchrun's LOCAL_RANK
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)  # nccl talks to each process's current GPU
    if not dist.is_initialized():
        dist.init_process_group(backend(device))
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def sum_over(world: World, value: float, device: torch.device) -> float:
    """The sum of `value` over all processes, reduced on `device` (the model's: nccl needs a GPU tensor)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
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
    loss_t = torch.tensor([loss], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss_t])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()
    return float(flat[-1])
