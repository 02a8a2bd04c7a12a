"""Adaptation jobs: a new task trained from a few examples by the live server, deployed when it ends.

`POST /admin/tasks/{task}/adapt` queues a job and answers 202 with it; `GET /admin/jobs/{id}` reports its state
(queued, running, done, failed, cancelled), step, loss and time left; `DELETE /admin/jobs/{id}` cancels it;
`GET /admin/jobs` lists them. A job runs the steps of `mhr adapt` (`training.adapt`: the same seed, examples and
settings give the same adapter) on a training view of the served backbone (`server.model.training_view`), so
the backbone's weights are not copied. Jobs take turns with inference: each optimizer step runs between two
engine steps (`between_steps`), at once while the engine is idle and, while requests run, within `job_share`
of the time; inside a step, requests that come meanwhile run at every MHR layer of its forward and backward.
`max_jobs` jobs train at once, taking turns; `max_queued_jobs` more wait (429 past them). A job
that ends deploys its task as a PUT does (`server.http.deploy`: a new bundle revision, atomic; requests running
on a replaced task finish on its old weights). A failed or cancelled job writes nothing; on shutdown, jobs are
cancelled. A job draws its random numbers (routing noise, dropout) from its own generator state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from fastapi import APIRouter

import mhr
from server.engine.contract import TrainableEngine
from server.engine.route_search import encode_whole
from server.http.admin_protocol import AdaptRequest, JobInfo, JobList
from server.http.deploy import Deployer, check_name
from server.http.errors import APIError
from server.http.metrics import ServerMetrics
from server.http.uploads import Upload
from server.model.training_view import training_view
from training.adapt import adaptation_data, adapted, start
from training.config import TrainConfig, TrainConfigError
from training.data import DataError, Example, parse_record
from training.loop import Optimization, TrainResult, run_metadata

KEEP_ENDED = 100  # ended jobs kept for GET, the oldest dropped first
ENDED = ("done", "failed", "cancelled")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobLimits:
    """`ServerConfig`'s max_jobs, max_queued_jobs, job_share and max_job_examples."""

    max_jobs: int = 1
    max_queued: int = 4
    share: float = 0.1
    max_examples: int = 1024


def _nothing() -> None:
    pass


class JobRNG:
    """A job's random number generator states, swapped in for each of its steps and swapped out after, so the
    job draws the same numbers as `mhr adapt` whatever else the process draws in between."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = [device] if device.type == "cuda" else []
        self.state: tuple | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.cuda):
            if self.state is not None:
                torch.set_rng_state(self.state[0])
                if self.cuda:
                    torch.cuda.set_rng_state(self.state[1], self.cuda[0])
            yield
            self.state = (torch.get_rng_state(), torch.cuda.get_rng_state(self.cuda[0]) if self.cuda else None)


class Job:
    """One adaptation job: its request, its progress, and (while it trains) its model and optimizer."""

    def __init__(self, task: str, config: TrainConfig, n_examples: int, data, replace: bool) -> None:
        self.id = f"job-{uuid.uuid4().hex[:16]}"
        self.task, self.config, self.n_examples, self.data, self.replace = task, config, n_examples, data, replace
        self.state, self.error, self.revision = "queued", None, None
        self.created, self.started, self.finished = time.time(), None, None
        self.cancel_requested = False
        self.run: Optimization | None = None  # while it trains
        self.result: TrainResult | None = None
        self.rng = JobRNG(config.torch_device)
        self.seconds = 0.0  # wall time of its steps, pauses between them included
        self._let_requests_run: Callable[[], None] = _nothing  # set while a step runs

    def info(self) -> JobInfo:
        result = self.result
        step = result.steps if result is not None else 0
        eta = None
        if self.state == "running" and step:
            eta = round(self.seconds / step * (self.config.steps - step), 3)
        return JobInfo(id=self.id, task=self.task, method=self.config.method, state=self.state, step=step,
                       steps=self.config.steps, loss=result.final_loss if result is not None else None,
                       eta_seconds=eta, created=self.created, started=self.started, finished=self.finished,
                       examples=self.n_examples, revision=self.revision, error=self.error)

    def setup(self, engine: TrainableEngine, bundle: mhr.Bundle) -> None:
        """The job's model (a training view of the served backbone with the bundle's inventory) and optimizer."""
        with engine.between_steps(), self.rng.active():
            model = training_view(engine.model)
            start(model, bundle, self.config)
            self.run = Optimization(model, self.data, self.config)
            self.result = self.run.result
            model.train()
            for layer in mhr.mhr_layers(model).values():
                layer.register_forward_hook(self._at_layer)

    def step(self, engine: TrainableEngine, share: float) -> None:
        """One optimizer step, between two of the engine's. At every MHR layer of its forward and backward passes,
        requests that came meanwhile run first, for up to (1 - share) / share times what the job held the engine
        for since it last let them."""
        held = time.perf_counter()

        def let_requests_run() -> None:
            nonlocal held
            engine.yield_to_steps((time.perf_counter() - held) * (1 - share) / share)
            held = time.perf_counter()

        with engine.between_steps(), self.rng.active():
            self._let_requests_run = let_requests_run
            try:
                self.run.step()
            finally:
                self._let_requests_run = _nothing

    def _at_layer(self, layer, inputs, output) -> None:
        """Forward hook of the job's MHR layers: a point where requests may run, in the forward pass and again
        when the backward pass reaches this output (what the step computes is unchanged)."""
        self._let_requests_run()
        if output.requires_grad:
            output.register_hook(lambda grad: self._let_requests_run())

    def adapter(self) -> Upload:
        found = adapted(self.run.model, self.config.method)
        return Upload(lora=found) if isinstance(found, mhr.LoRA) else Upload(logits=found)

    def end(self, state: str, error: str | None = None) -> None:
        """Record how it ended; let go of its model, optimizer and data."""
        self.state, self.error, self.finished = state, error, time.time()
        self.run = self.data = None


class JobRunner:
    """The admin routes of adaptation jobs and the worker that trains them on `deployer.engine`."""

    def __init__(self, deployer: Deployer, metrics: ServerMetrics, limits: JobLimits) -> None:
        self.deployer, self.engine, self.metrics, self.limits = deployer, deployer.engine, metrics, limits
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        # every job step on one thread: torch's CPU thread pool is per calling thread, and one per step would
        # leave idle pools spinning beside the engine's
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mhr-adapt")
        metrics.watch_jobs(self.counts)

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/admin")

        @router.post("/tasks/{task}/adapt", status_code=202)
        async def adapt(task: str, body: AdaptRequest) -> JobInfo:
            return await self.submit(task, body)

        @router.get("/jobs")
        async def jobs() -> JobList:
            return JobList(jobs=[job.info() for job in self.jobs.values()])

        @router.get("/jobs/{job_id}")
        async def job(job_id: str) -> JobInfo:
            return self._job(job_id).info()

        @router.delete("/jobs/{job_id}")
        async def cancel(job_id: str) -> JobInfo:
            return self.cancel(job_id)

        return router

    def counts(self) -> dict[str, int]:
        """Jobs by state (for the metrics)."""
        counts = dict.fromkeys(("queued", "running", *ENDED), 0)
        for job in self.jobs.values():
            counts[job.state] += 1
        return counts

    # ----- requests ---------------------------------------------------------------------------------

    async def submit(self, task: str, body: AdaptRequest) -> JobInfo:
        """Queue a job for `task` (checked in full first), start the worker if it sleeps."""
        check_name(task)
        if not isinstance(self.engine, TrainableEngine):
            raise APIError(400, "adaptation jobs need the torch engine (this server runs another)",
                           code="not_supported")
        if not body.replace and task in self.engine.tasks:
            raise APIError(409, f"task {task!r} already exists: send \"replace\": true to replace it",
                           code="task_exists")
        if any(job.task == task and job.state not in ENDED for job in self.jobs.values()):
            raise APIError(409, f"a job for task {task!r} is already queued or running", code="job_exists")
        if self.counts()["queued"] >= self.limits.max_queued:
            raise APIError(429, f"{self.limits.max_queued} adaptation jobs are waiting already: retry when one "
                                "has started", type="rate_limit_error", code="jobs_queue_full",
                           headers={"Retry-After": "5"})
        examples = _examples(task, body.examples, self.limits.max_examples)
        config = self._config(body)
        data = await asyncio.to_thread(self._data, task, examples, config)
        job = Job(task, config, len(examples), data, body.replace)
        self.jobs[job.id] = job
        self._forget_ended()
        self._ensure_worker()
        self._wake.set()
        log.info("adaptation job %s queued: task %r, %s, %d examples, %d steps", job.id, task, config.method,
                 len(examples), config.steps)
        return job.info()

    def cancel(self, job_id: str) -> JobInfo:
        job = self._job(job_id)
        if job.state in ENDED:
            raise APIError(409, f"job {job_id} has ended ({job.state}): nothing to cancel", code="job_ended")
        if job.state == "queued":
            self._end(job, "cancelled", "cancelled before it started")
        else:
            job.cancel_requested = True  # the worker stops it before its next step
            self._wake.set()
        return job.info()

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no job {job_id!r} (ended jobs are kept for the last {KEEP_ENDED})",
                           param="job_id", code="job_not_found")
        return job

    def _config(self, body: AdaptRequest) -> TrainConfig:
        settings = body.model_dump(exclude={"examples", "replace"})
        try:
            return TrainConfig(**settings, device=str(self.engine.device),
                               max_length=self.engine.config.max_seq_len)
        except TrainConfigError as e:
            raise APIError(400, str(e), code="invalid_settings") from None

    def _data(self, task: str, examples: list[Example], config: TrainConfig):
        """The job's batches; every example (prompt, answer and EOS) must fit the server's context."""
        tokenizer, limit = self.engine.tokenizer, self.engine.config.max_seq_len
        for i, example in enumerate(examples):
            n = len(encode_whole(tokenizer, example)[0])
            if n > limit:
                raise APIError(400, f"example {i} has {n} tokens with its answer; the context limit is {limit}",
                               param=f"examples.{i}", code="context_length_exceeded")
        try:
            return adaptation_data(tokenizer, examples, task, config)
        except DataError as e:
            raise APIError(400, str(e), param="examples", code="invalid_examples") from None

    # ----- the worker -------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())

    async def _work(self) -> None:
        """Run the jobs' steps in turn, between the engine's, until none is left."""
        turn = itertools.count()
        while True:
            await self._start_queued()
            running = [job for job in self.jobs.values() if job.state == "running"]
            if not running:
                return
            job = running[next(turn) % len(running)]
            if job.cancel_requested:
                self._end(job, "cancelled", "cancelled by an admin")
                continue
            began = time.perf_counter()
            try:
                await asyncio.get_running_loop().run_in_executor(self._thread, job.step, self.engine, self.limits.share)
            except Exception as e:  # the job fails; serving goes on
                log.exception("adaptation job %s failed at step %d", job.id, job.result.steps)
                self._end(job, "failed", f"training failed at step {job.result.steps}: {e}")
                continue
            spent = time.perf_counter() - began
            self.metrics.job_step()
            if self.engine.has_work:  # requests are running: give them the rest of the time
                await self._pause(spent * (1 - self.limits.share) / self.limits.share)
            job.seconds += time.perf_counter() - began
            if job.run.done and not job.cancel_requested:
                await self._deploy(job)

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less when a cancel request wakes the worker."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _start_queued(self) -> None:
        """Start queued jobs, oldest first, while fewer than `max_jobs` run."""
        for job in list(self.jobs.values()):
            if self.counts()["running"] >= self.limits.max_jobs:
                return
            if job.state == "queued":
                job.state, job.started = "running", time.time()
                try:
                    bundle = await asyncio.to_thread(mhr.Bundle.load, self.deployer.bundle_dir)
                    await asyncio.get_running_loop().run_in_executor(self._thread, job.setup, self.engine, bundle)
                except Exception as e:
                    log.exception("adaptation job %s could not start", job.id)
                    self._end(job, "failed", f"could not start: {self.deployer.relative(e)}")

    async def _deploy(self, job: Job) -> None:
        """Write the task to the bundle and serve it, as a PUT does."""
        metadata = run_metadata(job.config, f"adaptation job {job.id}", job.n_examples, job.result)
        try:
            _, job.revision = await self.deployer.deploy(job.task, job.adapter(), job.replace,
                                                         {**metadata, "deployed": "adapt"})
        except APIError as e:
            self._end(job, "failed", f"could not deploy the task: {e.message}")
            return
        self._end(job, "done")
        log.info("adaptation job %s done: task %r deployed (revision %d)", job.id, job.task, job.revision)

    def _end(self, job: Job, state: str, error: str | None = None) -> None:
        job.end(state, error)
        if job.started is not None:
            self.metrics.job_ended(state, job.finished - job.started)

    def _forget_ended(self) -> None:
        ended = [job_id for job_id, job in self.jobs.items() if job.state in ENDED]
        for job_id in ended[:max(0, len(ended) - KEEP_ENDED)]:
            del self.jobs[job_id]

    async def close(self) -> None:
        """Cancel every job (on shutdown); a running step ends first, and nothing is written."""
        for job in self.jobs.values():
            if job.state not in ENDED:
                self._end(job, "cancelled", "the server shut down")
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._thread.shutdown(wait=False)


def _examples(task: str, given, limit: int) -> list[Example]:
    """The request's examples as training examples: objects, or JSONL text in `mhr adapt`'s record format."""
    if isinstance(given, str):
        lines = [(n, line) for n, line in enumerate(given.splitlines(), 1) if line.strip()]
        examples = []
        for n, line in lines[:limit + 1]:
            try:
                examples.append(parse_record(line, known_tasks={task}))
            except ValueError as e:
                raise APIError(400, f"examples, line {n}: {e}", param="examples", code="invalid_examples") from None
    else:
        examples = [Example(task, e.input, e.output) for e in given]
    if not examples:
        raise APIError(400, "examples holds no record", param="examples", code="invalid_examples")
    if len(examples) > limit:
        raise APIError(400, f"more than {limit} examples: send at most {limit} (the server's max_job_examples)",
                       param="examples", code="too_many_examples")
    return examples
