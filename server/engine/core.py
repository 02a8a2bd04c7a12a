"""The engine: one backbone serving many tasks, with continuous batching at the token step.

Owns the step loop: admitting waiting requests (prefill), decoding one token for every running row,
streaming tokens, retiring finished and cancelled requests (their slot reference and KV row are freed
at once), and applying live task changes between steps. Everything that mutates engine state runs under
one lock, so a step is atomic to `cancel` and task changes. `serve` runs steps in a worker thread so an
asyncio server stays responsive while the model computes (torch releases the GIL inside its ops).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from mhr.adapter import LoRA
from mhr.bundle import Bundle
from server.config import ServerConfig
from server.engine.contract import bundle_max_rank, check_replacement, check_task_change
from server.engine.inventory import ServingInventory
from server.engine.kv_cache import RowKVCache, kv_dtype
from server.engine.outputs import EngineStats, RequestHandle, Result, TokenEvent, TokenLogprobs
from server.engine.prefix_cache import PrefixCache
from server.engine.requests import Request, check_request
from server.engine.sampling import make_generator, next_tokens, token_logprobs
from server.engine.scheduler import Scheduler, Start
from server.engine.sequence import Batch, Sequence, prefill_groups
from server.engine.slots import AdapterCache
from server.engine.tasks import BASE, ZERO_SHOT, TaskRegistry, UnknownTask
from server.model import cpu_kernel
from server.model.compiled import CompiledDecode
from server.model.decoder import Part, lean_decoder_for
from server.model.layers import PANEL_DTYPES, column_major_weights, panel_linears, wrap_model
from server.model.lora_ops import SlotPlan
from server.model.masks import model_mask

log = logging.getLogger(__name__)


class Engine:
    """Serve `bundle`'s tasks from `model` (a transformers causal LM, wrapped in place).

    Args:
        model: the backbone, already on the device and in the dtype it serves in.
        bundle: the skill inventory, routing and task adapters (checked against the model).
        config: slots and budgets (its model/bundle paths are not used here: see `from_config`).
        tokenizer: optional; needed for text in events and stop strings. Its EOS ends requests.
    """

    def __init__(self, model: nn.Module, bundle: Bundle, config: ServerConfig, tokenizer=None) -> None:
        bundle.check_backbone(model)
        self.model, self.config, self.tokenizer = model.eval(), config, tokenizer
        self.device = next(model.parameters()).device
        self.dtype = dtype = next(model.parameters()).dtype
        self.context, self.slots = wrap_model(model, list(bundle.modules), config.n_slots,
                                              config.max_rank or bundle_max_rank(bundle))
        self._mix_op = linear_op = None
        if self.device.type == "cpu" and dtype in PANEL_DTYPES and config.cpu_kernel:
            self._mix_op, linear_op = cpu_kernel.mix_skills(), cpu_kernel.panel_linear()
        if linear_op is not None:
            panel_linears(model, linear_op)
        elif self.device.type == "cpu" and dtype == torch.float32:  # measured: bf16 no gain, fp16 ~12x slower
            column_major_weights(model)
        self.tasks = TaskRegistry(bundle, self._inventory(bundle), config.allow_zero_shot)
        self.cache = AdapterCache(config.n_slots, self.slots.write_many)
        self.scheduler = Scheduler(config.max_waiting, config.max_running, config.max_prefill_tokens)
        self.prefixes = PrefixCache(int(config.prefix_cache_mb * 2**20)) if config.prefix_cache_mb else None
        # Llama-family models run our own decoder forward (same weights, same math); others transformers'.
        # Set to None to force the transformers forward (the benchmark compares both).
        self.lean = lean_decoder_for(model, config.max_seq_len)
        kv = kv_dtype(config.kv_dtype, self.device, dtype, lean=self.lean is not None)
        if kv != dtype and config.kv_dtype == "auto":
            log.info("KV cache and attention in float32: this CPU has no %s instructions (kv_dtype=%s halves the "
                     "cache's memory, at several times the attention's time)", config.dtype, config.dtype)
        self.kv = _kv_cache_for(model, config, self.device, kv)
        # the lean forward with its decode-only steps compiled (one graph per bucket of rows, all compiled now)
        self.compiled = None
        if config.compile and self.lean is not None:
            self.compiled = CompiledDecode(self.lean, self.context, self.kv, config.max_running)
            self.compiled.warm_up()
        self.batch = Batch(self.device)
        self._staged: Sequence | None = None   # a prompt over the step's prefill budget, prefilled in chunks
        self._staged_len = 0                   # its positions prefilled so far
        self.eos_ids = _eos_ids(model, tokenizer)
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.RLock()
        self._stepped = threading.Condition()  # notified after every step (`yield_to_steps` waits on it)
        self._wake: Callable[[], None] = lambda: None
        self._steps = self._batch_rows = 0
        self._zero_shot_slot = self._pin_zero_shot()

    def _pin_zero_shot(self) -> int | None:
        """Hold the zero-shot adapter in a slot for good (a reference released only by `replace_bundle`)."""
        if not self.config.allow_zero_shot:
            return None
        key = self.tasks.zero_shot_key
        slot = self.cache.acquire(key, lambda: self.tasks.load(key))
        self.cache.write_pending()
        return slot

    def _inventory(self, bundle: Bundle) -> ServingInventory:
        """`bundle`'s skills laid out for this model's slot groups."""
        return ServingInventory(bundle, [g.names for g in self.slots.groups], self.device, self.dtype, self._mix_op)

    @property
    def max_rank(self) -> int:
        """The largest LoRA rank a task may have (both engines offer it; here the slots' rank)."""
        return self.slots.max_rank

    def close(self) -> None:
        """Release what outlives the engine object (both engines offer it; nothing to do here)."""

    @contextmanager
    def between_steps(self) -> Iterator[None]:
        """Hold the engine between two steps: no step runs inside the block. For work that reads the model's
        weights on another thread, such as an adaptation job's training step (`server.http.jobs`)."""
        with self._lock:
            yield

    def yield_to_steps(self, seconds: float) -> None:
        """Inside `between_steps`: while requests wait or run, let the engine's steps run until none is left, or
        for `seconds` at most; then hold the engine again."""
        if seconds <= 0 or not self.has_work:
            return
        self._lock.release()
        try:
            with self._stepped:
                self._stepped.wait_for(lambda: not self.has_work, timeout=seconds)
        finally:
            self._lock.acquire()

    @classmethod
    def from_config(cls, config: ServerConfig) -> Engine:
        """Load the bundle `config` names and its backbone (`config.model`, else the one the bundle records)."""
        if not config.bundle:
            raise ValueError("no bundle given: set --bundle (or MHR_BUNDLE) to a bundle directory")
        bundle = Bundle.load(config.bundle)
        source = config.model or bundle.backbone
        model = AutoModelForCausalLM.from_pretrained(source, dtype=config.torch_dtype)
        model.to(config.device)
        return cls(model, bundle, config, AutoTokenizer.from_pretrained(source))

    # ----- requests ---------------------------------------------------------------------------------

    def submit(self, request: Request, on_event: Callable[[TokenEvent], None] | None = None) -> RequestHandle:
        """Queue a request; returns its handle. Raises QueueFull, UnknownTask or InvalidRequest at once."""
        check_request(request, self.config.max_seq_len, self._handles, self.model.config.vocab_size)
        self.tasks.resolve(request.task, request.mixture)  # fail fast; resolved again at admission (tasks change)
        handle = RequestHandle(request.request_id, on_event)
        self._handles[request.request_id] = handle
        try:
            self.scheduler.submit(request)
        except BaseException:
            del self._handles[request.request_id]
            raise
        self._wake()
        return handle

    def cancel(self, request_id: str) -> bool:
        """Stop a request now (waiting or running): its slot reference and KV row are freed before this
        returns (after the current step, if one is running). False if it is unknown or already finished."""
        with self._lock:
            request = self.scheduler.remove(request_id)
            if request is not None:
                self._finish(Result(request_id, "", finish_reason="cancelled", prompt_tokens=request.prompt_len))
                return True
            for row, seq in enumerate(self.batch.seqs):
                if seq.request.request_id == request_id:
                    seq.finish_reason = "cancelled"
                    self._retire(row)
                    return True
            if self._staged is not None and self._staged.request.request_id == request_id:
                seq, self._staged = self._staged, None
                seq.finish_reason = "cancelled"
                self._end(seq)
                return True
            return False

    def generate(self, requests: list[Request]) -> list[Result]:
        """Submit `requests` and run steps until all are done (for scripts and tests, no event loop)."""
        handles = [self.submit(r) for r in requests]
        while not all(h.done for h in handles):
            self.step()
        return [h.result() for h in handles]

    # ----- the step ---------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.batch) or self._staged is not None or self.scheduler.n_waiting > 0

    def step(self) -> None:
        """One forward for everything that moves: a token for every running request, the prompts admitted
        now (each gets its first token), and the next chunk of a prompt over the prefill budget.

        A step that fails (the forward raised, memory ran out) ends every request it held with finish reason
        "error" (the exception goes to the log, with the requests' ids), frees their slots and KV rows, and
        leaves the engine serving: the waiting requests and later ones run in the next steps."""
        with self._lock, torch.inference_mode():
            new: list[Sequence] = []
            try:
                self._step(new)
            except Exception:  # the details go to the log: a client is told only that it failed
                held = [seq.request.request_id for seq in [*self.batch.seqs, *new, *filter(None, [self._staged])]]
                log.exception("an engine step failed: its requests end with an error (request ids: %s)",
                              ", ".join(held))
                self._fail_step(new, "the engine step failed; retry the request")
        with self._stepped:
            self._stepped.notify_all()

    def _step(self, new: list[Sequence]) -> None:
        if self._staged is None:
            self._admit(new)
            if len(new) == 1 and new[0].request.prompt_len > self.config.max_prefill_tokens:
                self._stage(new.pop())  # the scheduler starts such a prompt alone
        else:  # prompts that fit in half the budget start beside the chunk, which gets the rest
            self._admit(new, self.config.max_prefill_tokens // 2)
        work = [self._decode_part()] if self.batch else []  # before the new rows join
        scoring = [s for s in new if s.request.params.prompt_logprobs is not None]  # all positions' logits
        # packed into one forward, another group costs only its attention: no padding then (measured: 16 prompts
        # of 16-64 tokens, 0.90x the step of groups padded up to 25 %); a forward per group costs a weight pass
        padding = 0.0 if self.lean is not None else 0.25
        for part in (scoring, [s for s in new if s.request.params.prompt_logprobs is None]):
            for group in prefill_groups([s.request.prompt_len - s.reused for s in part], padding):
                work.append(self._prefill_part([part[i] for i in group]))
        if self._staged is not None:
            work.append(self._chunk_part(self.config.max_prefill_tokens - sum(s.request.prompt_len for s in new)))
        if not work:
            return
        self._steps += 1
        logits = self._forward([part for part, _ in work])
        chosen = [row_logits for (_, done), out in zip(work, logits, strict=True)
                  if (row_logits := done(out)) is not None]
        if chosen:  # [rows, V] in row order: the running rows, then the new ones
            self._batch_rows += len(self.batch)
            self._record(torch.cat(chosen) if len(chosen) > 1 else chosen[0])

    def _fail_step(self, new: list[Sequence], error: str) -> None:
        """End every request a failed step held (running, staged, admitted in it) with `error`; empty the batch
        and the KV rows."""
        held = {id(seq): seq for seq in [*self.batch.seqs, *new, *([self._staged] if self._staged else [])]}
        for seq in held.values():
            if seq.request.request_id in self._handles:  # not already ended within the step
                if seq.slot and self.cache.refs(seq.slot):  # (a failed slot write has freed its slots)
                    self.cache.release(seq.slot)
                self._finish(seq.result("error", error))
        self.batch, self._staged = Batch(self.device), None
        self.kv.clear()

    def _admit(self, new: list[Sequence], budget: int | None = None) -> None:
        """Start waiting requests into `new` (`Scheduler.admit`, within `budget` prompt tokens when given), a KV
        row kept for a staged prompt; their adapters are in their slots when this returns."""

        def try_start(request: Request) -> Start:
            try:
                key = self.tasks.resolve(request.task, request.mixture)
            except UnknownTask as e:  # removed while it waited
                self._finish(Result(request.request_id, "", finish_reason="error", prompt_tokens=request.prompt_len,
                                    error=str(e)))
                return Start.DROPPED
            slot = 0 if key is None else self.cache.acquire(key, lambda: self.tasks.load(key))
            if slot is None:
                return Start.WAIT
            adapter = BASE if key is None else (ZERO_SHOT if key == self.tasks.zero_shot_key else key.name)
            seq = Sequence(request, slot, adapter, make_generator(request.params, self.device), cache_key=key)
            if self.prefixes is not None and request.params.prompt_logprobs is None:  # scoring needs every position
                found = self.prefixes.lookup(key, request.prompt)
                if found is not None:
                    seq.prefix, seq.reused = found
            new.append(seq)
            return Start.STARTED

        self.scheduler.admit(len(self.batch) + (self._staged is not None), try_start, budget)
        self.cache.write_pending()  # the cold tasks admitted in this step, materialized together

    def _decode_part(self) -> tuple[Part, Callable[[Tensor], Tensor]]:
        """The running rows' next tokens."""
        attention = self.kv.begin_decode()

        def done(logits: Tensor) -> Tensor:  # [n, 1, V]
            self.kv.end_decode(attention)
            return logits[:, -1]
        return Part(self.batch.last_tokens(), attention, self.batch.plan(), 1), done

    def _prefill_part(self, seqs: list[Sequence]) -> tuple[Part, Callable[[Tensor], Tensor]]:
        """New prompts together (right-padded; a prompt with a cached prefix from where it ends), each getting
        its first token; scoring its prompt too when asked (the group then keeps every position's logits:
        the engine groups such requests apart). They join the batch now; their prefixes go to the prefix
        cache once computed."""
        lengths, starts = [s.request.prompt_len for s in seqs], [s.reused for s in seqs]
        sizes = [n - start for n, start in zip(lengths, starts, strict=True)]       # positions to prefill
        width = max(sizes)
        ids = torch.tensor([s.request.prompt[s.reused:] + [0] * (width - m) for s, m in zip(seqs, sizes, strict=True)],
                           device=self.device)                                      # [m, L]
        rows = self.kv.add_rows(len(seqs))
        if any(starts):
            for row, seq in zip(rows, seqs, strict=True):
                self._load_prefix(row, seq)
            attention = self.kv.begin_prefill_after(rows, lengths, starts)
        else:
            attention = self.kv.begin_prefill(rows, lengths)
        self.batch.extend(seqs)
        scoring = seqs[0].request.params.prompt_logprobs is not None
        keep = list(range(width)) if scoring else sorted(set(m - 1 for m in sizes))  # last prompt positions

        def done(logits: Tensor) -> Tensor:  # [m, L, V] when scoring, else [m, |keep|, V]
            if scoring:
                for seq, row_logits, n in zip(seqs, logits, lengths, strict=True):
                    seq.score_prompt(row_logits[:n], 0)
            if self.prefixes is not None:
                for row, seq in zip(rows, seqs, strict=True):
                    self.prefixes.store(seq.cache_key, seq.request.prompt,
                                        lambda length, row=row: self.kv.read_prefix(row, length))
            cols = torch.tensor([keep.index(m - 1) for m in sizes], device=self.device)
            return logits[torch.arange(len(seqs), device=self.device), cols]
        plan = SlotPlan.of([s.slot for s in seqs], self.device)
        return Part(ids, attention, plan, width if scoring else torch.tensor(keep, device=self.device)), done

    def _stage(self, seq: Sequence) -> None:
        """Start prefilling a prompt over the step's budget in chunks, after its cached prefix if it has one."""
        self._staged, self._staged_len = seq, seq.reused
        self._load_prefix(self.kv.staging_row, seq)

    def _load_prefix(self, row: int, seq: Sequence) -> None:
        """Copy `seq`'s cached prompt prefix, if it found one, into KV row `row` (and let go of it)."""
        if seq.prefix is not None:
            self.kv.load_prefix(row, *seq.prefix)
            seq.prefix = None

    def _chunk_part(self, size: int) -> tuple[Part, Callable[[Tensor], Tensor | None]]:
        """The staged prompt's next `size` positions; once it is whole, it joins the running batch with its
        first token."""
        seq, start = self._staged, self._staged_len
        prompt = seq.request.prompt
        end = min(len(prompt), start + size)
        attention = self.kv.begin_chunk(start, end - start)
        ids = torch.tensor([prompt[start:end]], device=self.device)                   # [1, L]
        scoring = seq.request.params.prompt_logprobs is not None

        def done(logits: Tensor) -> Tensor | None:  # [1, keep, V]
            if scoring:
                seq.score_prompt(logits[0], start)
            self._staged_len = end
            if end < len(prompt):
                return None
            self._staged = None
            row = self.kv.adopt_staged(len(prompt))
            if self.prefixes is not None:
                self.prefixes.store(seq.cache_key, prompt, lambda length: self.kv.read_prefix(row, length))
            self.batch.extend([seq])
            return logits[:, -1]
        return Part(ids, attention, SlotPlan.of([seq.slot], self.device), end - start if scoring else 1), done

    def _forward(self, parts: list[Part]) -> list[Tensor]:
        """Each part's logits [n, keep, V]: one forward of them all (the lean decoder), else one each."""
        try:
            if self.lean is not None:
                self.context.plan = SlotPlan.packed([(part.ids.shape[1], part.plan) for part in parts])
                return (self.compiled or self.lean)(parts, self.kv)
            out = []
            for part in parts:
                self.context.plan = part.plan
                self.kv.select(part.attention)
                mask = model_mask(self.model.config, part.attention.mask, part.attention.positions)  # sliding windows
                out.append(self.model(input_ids=part.ids, attention_mask=mask,
                                      position_ids=part.attention.positions, past_key_values=self.kv,
                                      use_cache=True, logits_to_keep=part.keep).logits)
            return out
        finally:
            self.context.plan = None

    def _record(self, logits: Tensor) -> None:
        """Choose every running row's next token from its logits [n, V], append and stream it (with its
        log-probabilities when asked), and retire the rows that finished. A request for no tokens (a scored
        prompt) ends here."""
        rows = range(len(self.batch))
        seqs = self.batch.seqs
        tokens = next_tokens(logits, seqs)
        logprobs = _chosen_logprobs(logits, tokens, seqs)
        decode = self._decode_text if self.tokenizer is not None else None
        finished = {}
        for row, seq, token, logprob in zip(rows, seqs, tokens, logprobs, strict=True):
            params = seq.request.params
            scored = list(seq.prompt_logprobs) if params.prompt_logprobs is not None and not seq.tokens else None
            if params.max_new_tokens == 0:
                seq.finish_reason = "length"
                finished[row] = TokenEvent(seq.request.request_id, None, "", "length", prompt_logprobs=scored,
                                           adapter=seq.adapter)
                continue
            if logprob is not None:
                seq.logprobs.append(logprob)
            event = TokenEvent(seq.request.request_id, token, seq.append(token, self.eos_ids, decode),
                               seq.finish_reason, logprob, scored, seq.adapter)
            if seq.finish_reason is None:
                self._handles[seq.request.request_id].emit(event)
            else:
                finished[row] = event  # delivered with the result
        for row in sorted(finished, reverse=True):  # descending: the row moved into a hole is never finished
            self._retire(row, finished[row])

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _retire(self, row: int, last: TokenEvent | None = None) -> None:
        """Free a finished or cancelled row's KV row, slot reference, and hand out its result."""
        seq = self.batch.seqs[row]
        self.kv.remove_row(row)
        self.batch.remove_row(row)
        self._end(seq, last)

    def _end(self, seq: Sequence, last: TokenEvent | None = None) -> None:
        """Free a finished or cancelled sequence's slot reference and hand out its result."""
        if seq.slot:
            self.cache.release(seq.slot)
        self._finish(seq.result(), last)

    def _finish(self, result: Result, last: TokenEvent | None = None) -> None:
        """Hand out the result with the last event (a token-less one when the request ends without a token)."""
        handle = self._handles.pop(result.request_id)
        handle.finish(result, last or TokenEvent(result.request_id, None, "", result.finish_reason,
                                                 adapter=result.adapter))

    # ----- live task changes ------------------------------------------------------------------------

    def put_task(self, name: str, *, logits: Mapping[str, Tensor] | None = None, lora: LoRA | None = None) -> None:
        """Add or replace a task, by routing logits [h, K] per module or by its own LoRA (exactly one).

        Running requests of a replaced task finish on its old weights; new ones get the new weights.
        """
        check_task_change(logits, lora, self.max_rank)
        with self._lock:
            old = self.tasks.put_routed(name, logits) if lora is None else self.tasks.put_dense(name, lora)
            if old is not None:
                self.cache.invalidate(old)

    def remove_task(self, name: str) -> None:
        """Stop serving a task; its slot is freed once no running request uses it."""
        with self._lock:
            self.cache.invalidate(self.tasks.remove(name))

    def replace_bundle(self, bundle: Bundle) -> None:
        """Serve another bundle of the same backbone and adapted modules; running requests finish on the
        adapters they started with, whose slots are freed as they finish."""
        check_replacement(self.tasks.bundle, bundle, self.max_rank)
        inventory = self._inventory(bundle)
        with self._lock:
            for key in self.tasks.replace_bundle(bundle, inventory):
                self.cache.invalidate(key)
            if self._zero_shot_slot is not None:
                self.cache.release(self._zero_shot_slot)
            self._zero_shot_slot = self._pin_zero_shot()

    def resize_slots(self, n_slots: int) -> None:
        """Hold `n_slots` adapter slots per layer from now on (between steps; the empty slot, the zero-shot pin
        and at least one task: n_slots >= 3). Adapters in the slots kept stay; shrinking evicts the idle ones
        in the slots dropped and raises SlotsBusy, changing nothing, if a running request reads one."""
        if not isinstance(n_slots, int) or n_slots < 3:
            raise ValueError(f"n_slots must be an integer >= 3 (the empty slot, the zero-shot slot and at least one "
                             f"task), got {n_slots!r}")
        with self._lock:
            self.cache.resize(n_slots, self.slots.resize)

    def stats(self) -> EngineStats:
        """A snapshot of load and counters (cheap; for metrics scrapes)."""
        with self._lock:
            running = len(self.batch) + (self._staged is not None)
            prefix = None if self.prefixes is None else dataclasses.replace(self.prefixes.stats)
            return EngineStats(running, self.scheduler.n_waiting, self.slots.n_slots,
                               len(self.cache.resident()), len(self.tasks), self._steps,
                               self._batch_rows, dataclasses.replace(self.cache.stats), prefix)

    # ----- asyncio ----------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run steps for as long as the task runs (cancel it to stop), sleeping while there is no work."""
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(wake.set)
        # every step on one thread: torch's CPU thread pool belongs to the thread that calls it, and a step on
        # another thread each time would leave pools spinning idle beside the one at work
        thread = ThreadPoolExecutor(1, thread_name_prefix="mhr-engine")
        try:
            while True:
                if not self.has_work:
                    await wake.wait()
                    wake.clear()
                    continue
                await loop.run_in_executor(thread, self.step)
        finally:
            self._wake = lambda: None
            thread.shutdown(wait=False)


def _chosen_logprobs(logits: Tensor, tokens: list[int], seqs: list[Sequence]) -> list[TokenLogprobs | None]:
    """The log-probabilities of the chosen tokens (with each row's likeliest alternatives) for the rows that asked;
    None for the others. logits [n, V]."""
    asked = [i for i, seq in enumerate(seqs) if seq.request.params.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(seqs)
    if asked:
        top = max(seqs[i].request.params.logprobs for i in asked)
        index = torch.tensor(asked, device=logits.device)
        for i, logprob in zip(asked, token_logprobs(logits[index], [tokens[i] for i in asked], top), strict=True):
            out[i] = dataclasses.replace(logprob, top=logprob.top[:seqs[i].request.params.logprobs])
    return out


def _kv_cache_for(model: nn.Module, config: ServerConfig, device: torch.device, dtype: torch.dtype) -> RowKVCache:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return RowKVCache(c.num_hidden_layers, config.max_running, n_kv_heads, config.max_seq_len, head_dim,
                      device, dtype)


def _eos_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return frozenset()
    return frozenset(ids if isinstance(ids, list) else [ids])
