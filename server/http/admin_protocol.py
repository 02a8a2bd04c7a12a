"""The admin routes' bodies: a task routed from examples, adaptation jobs, the engine's slots.

Requests forbid unknown fields, as every request of the API does (`server.http.protocol`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server.http.protocol import Strict, Text

MAX_SLOTS = 4096       # adapter slots per layer an admin may ask for (each holds one adapter on the device)


# ----- admin: a new task's routing from examples ----------------------------------------------------

MAX_EXAMPLES = 64


class RouteExample(Strict):
    input: Text = Field(min_length=1)
    output: Text = Field(min_length=1)


class RouteRequest(Strict):
    """POST /admin/tasks/{task}/route: examples of the new task; `budget`: mixtures scored at most in the search
    after the candidates; `replace`: the name may already be served."""

    examples: list[RouteExample] = Field(min_length=1, max_length=MAX_EXAMPLES)
    budget: int = Field(24, ge=0, le=200)
    replace: bool = False


class RouteResponse(BaseModel):
    task: str
    kind: Literal["routed"] = "routed"
    replaced: bool
    revision: int
    mixture: dict[str, float]   # the tasks mixed, by share ("uniform": the skills' average)
    loss_before: float          # the examples' loss under what served the name before (zero-shot for a new name)
    loss_after: float
    evaluations: int            # routings scored
    seconds: float


# ----- admin: engine capacity ------------------------------------------------------------------------

class SlotsRequest(Strict):
    """PUT /admin/slots: adapter slots per layer from now on, the empty slot and the zero-shot slot included."""

    n_slots: int = Field(ge=3, le=MAX_SLOTS)


class SlotsResponse(BaseModel):
    n_slots: int
    slots_in_use: int


# ----- admin: adaptation jobs ------------------------------------------------------------------------

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
AdaptMethod = Literal["mhr-z", "mhr-mu", "mhr", "poly", "lora"]


class AdaptRequest(Strict):
    """POST /admin/tasks/{task}/adapt: train a new task on `examples` (objects, or JSONL text of
    {"input", "output"} records) as `mhr adapt` does; the settings are `mhr adapt`'s (`training.config.TrainConfig`),
    except `steps`, 100 here. `replace`: the name may already be served."""

    examples: list[RouteExample] | Text = Field(min_length=1)
    method: AdaptMethod = "mhr-z"
    steps: int = Field(100, ge=1, le=100_000)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    logits_lr: float = Field(0.1, gt=0, allow_inf_nan=False)
    batch_size: int = Field(8, ge=1, le=1024)
    grad_accum: int = Field(1, ge=1, le=1024)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, lt=2**63)
    replace: bool = False


class JobInfo(BaseModel):
    """An adaptation job: its state, progress and, once it ended, what it deployed or why it failed."""

    id: str
    task: str
    method: str
    state: JobState
    step: int                          # optimizer steps done
    steps: int
    loss: float | None                 # mean loss per target token of the last (up to) 10 steps
    eta_seconds: float | None          # estimated time left (running jobs, once a step has run)
    created: float                     # unix times
    started: float | None
    finished: float | None
    examples: int
    revision: int | None = None        # the bundle revision that holds the task (done)
    error: str | None = None           # failed or cancelled: why


class JobList(BaseModel):
    jobs: list[JobInfo]
