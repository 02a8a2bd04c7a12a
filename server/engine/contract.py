"""What the HTTP layer asks of an engine (`ServingEngine`; `TrainableEngine` for adaptation jobs), and the checks
every engine makes of a task change.

Both engines keep this contract: the torch engine (`server.engine.core.Engine`) and the vLLM engine
(`server.vllm_backend.engine.VLLMEngine`). The serving and admin layers are typed against it and use
nothing else of an engine: no attribute probing, no reaching into an engine's bundle. What is served
under which name, and what the served tasks are, comes from the task registry both engines share
(`server.engine.tasks.TaskRegistry`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mhr.adapter import LoRA
from mhr.bundle import Bundle
from server.config import ServerConfig
from server.engine.outputs import EngineStats, RequestHandle, TokenEvent
from server.engine.requests import InvalidRequest, Request
from server.engine.tasks import TaskRegistry


class SlotsFixed(RuntimeError):
    """This engine's number of adapters is fixed at start (`ServingEngine.resize_slots`)."""


@runtime_checkable
class ServingEngine(Protocol):
    """An engine as the HTTP layer sees it.

    Attributes:
        config: the process's settings (max_seq_len bounds a request's tokens).
        tokenizer: a transformers tokenizer: prompts in, text out.
        tasks: the task registry: the names served, which adapter serves a name, the served tasks' routing.
    """

    config: ServerConfig
    tokenizer: Any
    tasks: TaskRegistry

    @property
    def max_rank(self) -> int:
        """The largest LoRA rank a task may have."""

    def submit(self, request: Request, on_event: Callable[[TokenEvent], None] | None = None) -> RequestHandle:
        """Queue a request; raises QueueFull, UnknownTask or InvalidRequest at once."""

    def cancel(self, request_id: str) -> bool:
        """Stop a request (waiting or running); False if unknown or finished."""

    def stats(self) -> EngineStats:
        """A snapshot of load and counters."""

    def put_task(self, name: str, *, logits: Mapping[str, Tensor] | None = None, lora: LoRA | None = None) -> None:
        """Add or replace a task (checked by `check_task_change`); running requests finish on the old weights."""

    def remove_task(self, name: str) -> None:
        """Stop serving a task; running requests finish on it."""

    def replace_bundle(self, bundle: Bundle) -> None:
        """Serve another bundle (checked by `check_replacement`); running requests finish on theirs."""

    def resize_slots(self, n_slots: int) -> None:
        """Hold `n_slots` adapters from now on; raises SlotsFixed where the engine cannot, SlotsBusy where a
        running request reads an adapter that would go."""

    async def serve(self) -> None:
        """Drive the engine for as long as the task runs (cancel it to stop)."""

    def close(self) -> None:
        """Release what the engine holds (processes, files)."""


@runtime_checkable
class TrainableEngine(ServingEngine, Protocol):
    """An engine beside which adaptation jobs (`server.http.jobs`) train on the served backbone: the torch
    engine's. Jobs read the model's weights (never writing them) only while they hold the engine between two of
    its steps.

    Attributes:
        model: the served transformers model (its linears wrapped for the slots).
        device: where it lives.
    """

    model: nn.Module
    device: torch.device

    @property
    def has_work(self) -> bool:
        """Requests wait or run."""

    def between_steps(self) -> AbstractContextManager[None]:
        """Hold the engine between two steps: no step runs inside the block."""

    def yield_to_steps(self, seconds: float) -> None:
        """Inside `between_steps`: while requests wait or run, let steps run until none is left, or `seconds`."""


def bundle_max_rank(bundle: Bundle) -> int:
    """The largest rank among the bundle's adapters (routed tasks have the inventory's rank)."""
    extra = [*bundle.adapters.values(), *([bundle.zero_shot] if bundle.zero_shot is not None else [])]
    return max([bundle.config.rank, *(lora.rank for lora in extra)])


def check_task_change(logits: Mapping[str, Tensor] | None, lora: LoRA | None, max_rank: int) -> None:
    """A task is given by exactly one of routing logits and a LoRA, whose rank fits the engine's."""
    if (logits is None) == (lora is None):
        raise ValueError("give exactly one of logits and lora")
    if lora is not None and lora.rank > max_rank:
        raise InvalidRequest(f"LoRA rank {lora.rank} exceeds the engine's max rank {max_rank}")


def check_replacement(current: Bundle, new: Bundle, max_rank: int) -> None:
    """A bundle can replace the one served when it adapts the same backbone and modules within the rank."""
    if new.fingerprint != current.fingerprint or set(new.modules) != set(current.modules):
        raise ValueError("the new bundle adapts another backbone or other modules than the one served: "
                         "start a new engine for it")
    if bundle_max_rank(new) > max_rank:
        raise ValueError(f"the new bundle needs rank {bundle_max_rank(new)}; the engine holds rank {max_rank}")
