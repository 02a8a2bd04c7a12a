"""Serving logic between the wire protocol and the engine: requests in, responses and SSE chunks out.

Turns protocol requests into engine requests (tokenizing prompts and chat messages, checking them
against the context limit), runs them, and builds OpenAI-shaped responses or streams. Maps engine
refusals to API errors with a status code. Knows nothing of routes: `server.http.app` owns those.

No request holds the event loop: a prompt's length in characters is checked against what can fit in the
context before it is tokenized, and tokenizing (and rendering a chat template) runs on a worker thread.
Each response and stream chunk names the adapter that produced it, which is the one resolved on
acceptance unless the task changed before the request started. At the drain deadline of a shutdown
(`cut`), open streams end with an error event and waiting responses with a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mhr.bundle_check import BundleError, check_task_name
from server.engine.contract import ServingEngine, SlotsFixed
from server.engine.outputs import RequestHandle, Result, TokenEvent
from server.engine.requests import InvalidRequest, Request, SamplingParams
from server.engine.scheduler import QueueFull
from server.engine.slots import SlotsBusy
from server.engine.tasks import MIXTURE_PREFIX, InvalidMixture, Mixture, UnknownTask
from server.http.errors import APIError
from server.http.logprobs import chat_logprobs, completion_logprobs
from server.http.metrics import ServerMetrics
from server.http.protocol import (
    AdapterInfo,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    GeneratedText,
    GenerateRequest,
    GenerateResponse,
    Sampling,
    SkillMix,
    SlotsResponse,
    Usage,
)

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
DEFAULT_CHAT_TEMPLATE = "{role}: {content}\n"  # used when the tokenizer has no chat template
# Characters a prompt may have per token of the context: twice the longest token's text, a margin for
# tokenizers that normalize text shorter (any longer prompt cannot fit, so it is refused untokenized).
CHARS_PER_TOKEN_MARGIN = 2
_CUT = object()  # put in an open stream's queue at the drain deadline


Disconnected = Callable[[], Awaitable[bool]]


@dataclass
class Prepared:
    """Engine requests ready to submit, with the adapter that will serve them."""

    requests: list[Request]   # n a prompt, prompt after prompt
    adapter: str              # resolved on acceptance; a stream sets it to its first event's
    n: int = 1  # choices per prompt


def metrics_label(adapter: str) -> str:
    """The metrics label of an adapter: per-request mixtures share one, so clients cannot mint new series."""
    return "mix" if adapter.startswith(MIXTURE_PREFIX) else adapter


def prompt_char_limit(tokenizer, max_seq_len: int) -> int:
    """The most characters a prompt can have and still fit in `max_seq_len` tokens: no token covers more
    characters than its own text has (byte-level BPE, SentencePiece and character vocabularies alike)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    longest = max((len(t) for t in tokens if isinstance(t, str)), default=1)
    return max_seq_len * max(longest, 1) * CHARS_PER_TOKEN_MARGIN


class Serving:
    """The API's view of one engine (and its tokenizer)."""

    def __init__(self, engine: ServingEngine, metrics: ServerMetrics) -> None:
        if engine.tokenizer is None:
            raise ValueError("serving text needs the engine's tokenizer")
        self.engine, self.tokenizer, self.metrics = engine, engine.tokenizer, metrics
        self.token_text = functools.lru_cache(maxsize=2**16)(lambda token: self.tokenizer.decode([token]))
        self.max_prompt_chars = prompt_char_limit(self.tokenizer, engine.config.max_seq_len)
        # one thread: a fast tokenizer is not safe to call from several threads at once, and a bounded
        # prompt takes milliseconds
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="mhr-tokenize")
        self._open_streams: set[asyncio.Queue] = set()
        self._cut: asyncio.Event | None = None  # set at the drain deadline

    # ----- requests -> engine -----------------------------------------------------------------------

    def adapter_for(self, task: str) -> str:
        """Which adapter will serve `task` (400 for an invalid name, 404 when no adapter may)."""
        try:
            check_task_name(task, where="model")
        except BundleError as e:
            raise APIError(400, str(e), param="model", code="invalid_model_name") from None
        try:
            return self.engine.tasks.adapter_name(task)
        except UnknownTask as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None

    async def tokenize(self, prompts: list[str | list[int]], param: str) -> list[list[int]]:
        """Token ids of `prompts` (texts, or token ids checked against the vocabulary), tokenized off the loop."""
        vocab = len(self.tokenizer)
        for prompt in prompts:
            if isinstance(prompt, str):
                self._check_chars(len(prompt), param)
            elif any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param=param)
        texts = [p for p in prompts if isinstance(p, str)]
        ids = iter(await self._off_loop(lambda: self.tokenizer(texts).input_ids) if texts else [])
        return [next(ids) if isinstance(p, str) else list(p) for p in prompts]

    async def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        if getattr(self.tokenizer, "chat_template", None):
            ids = await self._off_loop(self.tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                       tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = "".join(DEFAULT_CHAT_TEMPLATE.format(**m) for m in messages) + "assistant:"
        return await self._off_loop(lambda: self.tokenizer(text).input_ids)

    def _check_chars(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {chars} characters, more than can fit in the context limit of "
                                f"{self.engine.config.max_seq_len} tokens (at most {self.max_prompt_chars} "
                                "characters are tokenized): shorten the prompt", param=param,
                           code="context_length_exceeded")

    async def _off_loop(self, work: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizing, functools.partial(work, *args, **kwargs))

    def mixture(self, mix: SkillMix) -> Mixture:
        """The per-request mixture a request's `mhr` field asks for (400 when it does not fit the bundle)."""
        try:
            return self.engine.tasks.mixture(mix.mix, mix.skills)
        except InvalidMixture as e:
            raise APIError(400, str(e), param=e.field) from None

    def prepare(self, task: str, prompts: list[list[int]], sampling: Sampling, max_tokens: int | None,
                param: str, logprobs: int | None = None, prompt_logprobs: int | None = None, n: int = 1) -> Prepared:
        """Engine requests for `prompts`, `n` each (a seed gives choice j seed + j), checked against the context
        limit."""
        mixture = self.mixture(sampling.mhr) if sampling.mhr is not None else None
        adapter = mixture.name if mixture is not None else self.adapter_for(task)
        limit = self.engine.config.max_seq_len
        requests = []
        for ids in prompts:
            budget = limit - len(ids)
            if budget < (1 if max_tokens is None else 0):
                raise APIError(400, f"the prompt has {len(ids)} tokens; the context limit is {limit}: "
                                    "shorten the prompt", param=param, code="context_length_exceeded")
            wanted = budget if max_tokens is None else max_tokens
            if wanted > budget:
                raise APIError(400, f"the prompt has {len(ids)} tokens and max_tokens is {wanted}; together "
                                    f"they exceed the context limit of {limit}: lower max_tokens to {budget} "
                                    "or shorten the prompt", param="max_tokens", code="context_length_exceeded")
            for choice in range(n):
                try:
                    params = SamplingParams(max_new_tokens=wanted, **sampling.sampling_fields(),
                                            seed=None if sampling.seed is None else sampling.seed + choice,
                                            logprobs=logprobs, prompt_logprobs=prompt_logprobs)
                except InvalidRequest as e:
                    raise APIError(400, str(e)) from None
                requests.append(Request(ids, task, params, mixture=mixture))
        return Prepared(requests, adapter, n)

    def submit(self, prepared: Prepared) -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for request in prepared.requests:
                handles.append(self.engine.submit(request))
        except QueueFull as e:
            self._cancel(handles)
            raise APIError(429, f"the server is at capacity ({e}); retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except UnknownTask as e:
            self._cancel(handles)
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        except InvalidRequest as e:
            self._cancel(handles)
            raise APIError(400, str(e)) from None
        return handles

    def _cancel(self, handles: list[RequestHandle]) -> None:
        for h in handles:
            self.engine.cancel(h.request_id)

    async def results(self, prepared: Prepared, disconnected: Disconnected) -> list[Result]:
        """Run `prepared` to completion; cancels it when the client goes away first (or at the drain deadline:
        503)."""
        started = time.monotonic()
        handles = self.submit(prepared)
        waiter = asyncio.ensure_future(asyncio.gather(*(h.wait() for h in handles)))
        watchers = {asyncio.ensure_future(_until(disconnected)), asyncio.ensure_future(self._drain_cut().wait())}
        try:
            await asyncio.wait({waiter, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watcher in watchers:
                watcher.cancel()
            if not waiter.done():
                waiter.cancel()
                self._end_uncounted(handles, prepared, started)
        if not waiter.done() or waiter.cancelled():
            if self._drain_cut().is_set():
                raise _shutting_down()
            raise asyncio.CancelledError
        results = waiter.result()
        for r in results:
            self._count(r, prepared, started)
        for r in results:
            if r.finish_reason == "error":
                raise _unavailable(r)
        return results

    async def open_stream(self, prepared: Prepared, render: Callable[[int, TokenEvent, str | None], str],
                          usage: Callable[[Usage], str] | None, disconnected: Disconnected) -> AsyncIterator[str]:
        """Submit `prepared` and wait for its first event (the client watched meanwhile), so that the response's
        head can name the adapter that serves it and a request that fails before its first token gets an error
        status; then the SSE lines, the first included (see `stream`)."""
        lines = self.stream(prepared, self.submit(prepared), render, usage)
        first = asyncio.ensure_future(anext(lines))
        watcher = asyncio.ensure_future(_until(disconnected))
        try:
            await asyncio.wait({first, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not first.done():
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await first
                await lines.aclose()
        if first.cancelled():
            raise asyncio.CancelledError
        return _after(first.result(), lines)

    async def stream(self, prepared: Prepared, handles: list[RequestHandle],
                     render: Callable[[int, TokenEvent, str | None], str],
                     usage: Callable[[Usage], str] | None) -> AsyncIterator[str]:
        """SSE lines for submitted requests: `render(index, event, finish_reason)` per event that brings text,
        log-probabilities or the end, then usage, then [DONE]. A request that fails before any line went out
        raises its APIError; one that fails later, or the drain deadline, ends the stream with an error event.
        The requests are cancelled in the engine (and counted as such) when the consumer stops iterating
        (client gone).
        """
        started = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, handle: RequestHandle) -> None:
            async for event in handle:
                await queue.put((index, event))

        pumps = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        self._open_streams.add(queue)
        if self._drain_cut().is_set():  # opened after the drain deadline
            queue.put_nowait(_CUT)
        sent, counted = False, set()
        try:
            remaining = len(handles)
            while remaining:
                item = await queue.get()
                if item is _CUT:
                    if not sent:
                        raise _shutting_down()
                    yield _error_line(_shutting_down())
                    return
                index, event = item
                if not sent and event.adapter:
                    prepared.adapter = event.adapter
                reason = None
                if event.finish_reason is not None:
                    remaining -= 1
                    result = await handles[index].wait()
                    self._count(result, prepared, started)
                    counted.add(index)
                    if result.finish_reason == "error":  # before the head went out: a status; after: an event
                        if not sent:
                            raise _unavailable(result)
                        yield _error_line(_unavailable(result))
                        return
                    reason = FINISH_REASONS.get(event.finish_reason, event.finish_reason)
                if event.text or event.logprobs is not None or reason is not None:
                    sent = True
                    yield _sse(render(index, event, reason))
            if usage is not None:
                results = [await h.wait() for h in handles]
                yield _sse(usage(_usage(results, prepared.n)))
            yield "data: [DONE]\n\n"
        finally:
            self._open_streams.discard(queue)
            for p in pumps:
                p.cancel()
            self._end_uncounted([h for i, h in enumerate(handles) if i not in counted], prepared, started)

    def cut_streams(self) -> None:
        """The drain deadline: end every open stream with an error event and answer waiting requests 503."""
        self._drain_cut().set()
        for queue in self._open_streams:
            queue.put_nowait(_CUT)

    def _drain_cut(self) -> asyncio.Event:
        if self._cut is None:  # made on the event loop, on first use
            self._cut = asyncio.Event()
        return self._cut

    def _count(self, result: Result, prepared: Prepared, started: float) -> None:
        self.metrics.finished(metrics_label(result.adapter or prepared.adapter), result, time.monotonic() - started)

    def _end_uncounted(self, handles: list[RequestHandle], prepared: Prepared, started: float) -> None:
        """Cancel the requests whose client left (or whose drain deadline came) and count each once, with the
        finish reason it ended with: "cancelled", unless it finished before the cancel reached it."""
        self._cancel([h for h in handles if not h.done])
        for h in handles:  # an engine that cancels asynchronously (vLLM) has no result yet
            self._count(h.result(0) if h.done else Result(h.request_id, "", finish_reason="cancelled"),
                        prepared, started)
    async def resize_slots(self, n_slots: int) -> SlotsResponse:
        """Give the engine `n_slots` adapter slots per layer (between steps), or say why not (nothing changes)."""
        try:
            await asyncio.to_thread(self.engine.resize_slots, n_slots)
        except SlotsFixed as e:
            raise APIError(400, str(e), param="n_slots", code="not_supported") from None
        except SlotsBusy as e:
            raise APIError(409, f"{e}; nothing changed", param="n_slots", code="slots_busy") from None
        stats = self.engine.stats()
        return SlotsResponse(n_slots=stats.slots, slots_in_use=stats.slots_in_use)

    # ----- protocol -> response ---------------------------------------------------------------------

    async def completion_inputs(self, request: CompletionRequest) -> Prepared:
        scored = request.logprobs if request.echo else None
        prompts = await self.tokenize(request.prompts(), "prompt")
        return self.prepare(request.model, prompts, request, request.max_tokens, "prompt", request.logprobs, scored,
                            request.n or 1)

    async def completion(self, request: CompletionRequest, disconnected: Disconnected) -> CompletionResponse:
        prepared = await self.completion_inputs(request)
        results = await self.results(prepared, disconnected)
        prompts = [prompt for prompt in request.prompts() for _ in range(prepared.n)]
        pairs = zip(prompts, prepared.requests, results, strict=True)
        choices = [self._completion_choice(request, i, prompt, engine_request.prompt, result)
                   for i, (prompt, engine_request, result) in enumerate(pairs)]
        return CompletionResponse(model=request.model, mhr=AdapterInfo(adapter=_served_by(results, prepared)),
                                  usage=_usage(results, prepared.n), choices=choices)

    def _completion_choice(self, request: CompletionRequest, index: int, prompt: str | list[int], ids: list[int],
                           result: Result) -> CompletionChoice:
        """The completion, after its prompt (as given, or decoded from ids) when echoed, with the log-probabilities
        asked for: the generated tokens', and with echo the prompt's first."""
        text, tokens, logprobs = result.text, list(result.tokens), list(result.logprobs or [])
        if request.echo:
            text, tokens, logprobs = self._after_prompt(prompt, ids, result.prompt_logprobs, text, tokens, logprobs)
        return CompletionChoice(index=index, text=text, finish_reason=FINISH_REASONS.get(result.finish_reason),
                                logprobs=None if request.logprobs is None else
                                completion_logprobs(tokens, logprobs, self.token_text))

    def _after_prompt(self, prompt: str | list[int], ids: list[int], prompt_logprobs: list | None, text: str,
                      tokens: list[int], logprobs: list) -> tuple[str, list[int], list]:
        """`text`, `tokens` and their `logprobs` after the echoed prompt's: its text (as given, or decoded from
        its ids), ids and log-probabilities."""
        prompt_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
        return prompt_text + text, ids + tokens, list(prompt_logprobs or []) + logprobs

    async def completion_stream(self, request: CompletionRequest, prepared: Prepared,
                                disconnected: Disconnected) -> AsyncIterator[str]:
        head = CompletionResponse(model=request.model, mhr=AdapterInfo(adapter=prepared.adapter), choices=[])
        offsets = [0] * len(prepared.requests)  # characters of each choice's tokens so far
        to_echo = [prompt for prompt in request.prompts() for _ in range(prepared.n)] if request.echo else []

        def render(index: int, event: TokenEvent, reason: str | None) -> str:
            text, tokens, logprobs = event.text, [], []
            if event.logprobs is not None:
                tokens, logprobs = [event.token], [event.logprobs]
            if to_echo and to_echo[index] is not None:  # the prompt comes first, with the choice's first chunk
                text, tokens, logprobs = self._after_prompt(to_echo[index], prepared.requests[index].prompt,
                                                            event.prompt_logprobs, text, tokens, logprobs)
                to_echo[index] = None
            shaped = None
            if request.logprobs is not None and tokens:
                shaped = completion_logprobs(tokens, logprobs, self.token_text, offsets[index])
                offsets[index] += sum(map(len, shaped.tokens))
            choice = CompletionChoice(index=index, text=text, finish_reason=reason, logprobs=shaped)
            update = {"choices": [choice], "mhr": AdapterInfo(adapter=event.adapter or prepared.adapter)}
            return head.model_copy(update=update).model_dump_json(exclude_none=False)

        def usage(u: Usage) -> str:
            return head.model_copy(update={"usage": u, "mhr": AdapterInfo(adapter=prepared.adapter)}).model_dump_json()

        include_usage = request.stream_options is not None and request.stream_options.include_usage
        return await self.open_stream(prepared, render, usage if include_usage else None, disconnected)

    async def chat_inputs(self, request: ChatCompletionRequest) -> Prepared:
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        return self.prepare(request.model, [await self.chat_prompt(request)], request, request.token_limit,
                            "messages", logprobs, n=request.n or 1)

    async def chat(self, request: ChatCompletionRequest, disconnected: Disconnected) -> ChatCompletionResponse:
        prepared = await self.chat_inputs(request)
        results = await self.results(prepared, disconnected)
        return ChatCompletionResponse(
            model=request.model, mhr=AdapterInfo(adapter=_served_by(results, prepared)),
            usage=_usage(results, prepared.n),
            choices=[ChatChoice(index=i, message=ChatResponseMessage(content=r.text),
                                finish_reason=FINISH_REASONS.get(r.finish_reason),
                                logprobs=None if r.logprobs is None else chat_logprobs(r.logprobs, self.token_text))
                     for i, r in enumerate(results)])

    async def chat_stream(self, request: ChatCompletionRequest, prepared: Prepared,
                          disconnected: Disconnected) -> AsyncIterator[str]:
        head = ChatCompletionChunk(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                   model=request.model, choices=[], mhr=AdapterInfo(adapter=prepared.adapter))
        begun: set[int] = set()  # choices whose first chunk (with the role) has gone out

        def render(index: int, event: TokenEvent, reason: str | None) -> str:
            delta = ChatDelta(role=None if index in begun else "assistant", content=event.text or None)
            begun.add(index)
            logprobs = None if event.logprobs is None else chat_logprobs([event.logprobs], self.token_text)
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=reason, logprobs=logprobs)
            update = {"choices": [choice], "mhr": AdapterInfo(adapter=event.adapter or prepared.adapter)}
            return head.model_copy(update=update).model_dump_json()

        def usage(u: Usage) -> str:
            return head.model_copy(update={"usage": u, "mhr": AdapterInfo(adapter=prepared.adapter)}).model_dump_json()

        include_usage = request.stream_options is not None and request.stream_options.include_usage
        return await self.open_stream(prepared, render, usage if include_usage else None, disconnected)

    async def generate_inputs(self, task: str, request: GenerateRequest) -> Prepared:
        inputs = request.inputs if isinstance(request.inputs, list) else [request.inputs]
        return self.prepare(task, await self.tokenize(inputs, "inputs"), request, request.max_new_tokens, "inputs")

    async def generate_stream(self, prepared: Prepared, disconnected: Disconnected) -> AsyncIterator[str]:
        def render(index: int, event: TokenEvent, reason: str | None) -> str:
            return json.dumps({"text": event.text, "finish_reason": reason,
                               "adapter": event.adapter or prepared.adapter})

        return await self.open_stream(prepared, render, None, disconnected)

    async def generate(self, task: str, request: GenerateRequest, disconnected: Disconnected) -> GenerateResponse:
        prepared = await self.generate_inputs(task, request)
        results = await self.results(prepared, disconnected)
        return GenerateResponse(task=task, adapter=_served_by(results, prepared), outputs=[
            GeneratedText(text=r.text, finish_reason=FINISH_REASONS.get(r.finish_reason, r.finish_reason),
                          prompt_tokens=r.prompt_tokens, completion_tokens=len(r.tokens)) for r in results])


def _unavailable(result: Result) -> APIError:
    return APIError(503, f"the request could not be served: {result.error}", type="server_error",
                    code="task_unavailable")


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down and its drain deadline has passed: retry the request "
                         "(on another replica)", type="server_error", code="shutting_down")


def _error_line(error: APIError) -> str:
    """An error reported inside a stream whose head has gone out: a last data line with OpenAI's error body."""
    return _sse(json.dumps(error.body()))


async def _after(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    """`first`, then the lines of `rest` (closed with this iterator)."""
    try:
        yield first
        async for line in rest:
            yield line
    finally:
        await rest.aclose()


def _served_by(results: list[Result], prepared: Prepared) -> str:
    """The adapter that served `results`: the one resolved on acceptance unless the task changed while they
    waited (e.g. it was removed and the zero-shot adapter served them)."""
    served = {r.adapter for r in results if r.adapter}
    return served.pop() if len(served) == 1 else prepared.adapter


def _usage(results: list[Result], n: int = 1) -> Usage:
    """Token counts of a response: each prompt once (its `n` choices share it), every choice's completion."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(len(r.tokens) for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


async def _until(disconnected: Disconnected, every: float = 0.25) -> None:
    while not await disconnected():
        await asyncio.sleep(every)

