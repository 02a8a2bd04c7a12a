"""Serving logic between the wire protocol and the engine: requests in, responses and SSE chunks out.

Turns protocol requests into engine requests (tokenizing prompts and chat messages, checking them
against the context limit), has them run (`server.http.runner`), and builds OpenAI-shaped responses or
stream chunks. Knows nothing of routes: `server.http.app` owns those.

No request holds the event loop: a prompt's length in characters is checked against what can fit in the
context before it is tokenized, and tokenizing (and rendering a chat template) runs on a worker thread.
Each response and stream chunk names the adapter that produced it, which is the one resolved on
acceptance unless the task changed before the request started.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from mhr.bundle_check import BundleError, check_task_name
from server.engine.contract import ServingEngine, SlotsFixed
from server.engine.outputs import Result, TokenEvent
from server.engine.requests import InvalidRequest, Request, SamplingParams
from server.engine.slots import SlotsBusy
from server.engine.tasks import InvalidMixture, Mixture, UnknownTask
from server.http.admin_protocol import SlotsResponse
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
    Usage,
)
from server.http.runner import FINISH_REASONS, Disconnected, Prepared, Runner, usage_of

DEFAULT_CHAT_TEMPLATE = "{role}: {content}\n"  # used when the tokenizer has no chat template
# Characters a prompt may have per token of the context: twice the longest token's text, a margin for
# tokenizers that normalize text shorter (any longer prompt cannot fit, so it is refused untokenized).
CHARS_PER_TOKEN_MARGIN = 2


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
        # one thread: a bounded prompt takes milliseconds, and requests tokenized one after another hold one
        # prompt's tokenizer memory (~400 bytes a character) at a time, however many arrive together
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="mhr-tokenize")
        self.runner = Runner(engine, metrics)

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
        results = await self.runner.results(prepared, disconnected)
        prompts = [prompt for prompt in request.prompts() for _ in range(prepared.n)]
        pairs = zip(prompts, prepared.requests, results, strict=True)
        choices = [self._completion_choice(request, i, prompt, engine_request.prompt, result)
                   for i, (prompt, engine_request, result) in enumerate(pairs)]
        return CompletionResponse(model=request.model, mhr=AdapterInfo(adapter=_served_by(results, prepared)),
                                  usage=usage_of(results, prepared.n), choices=choices)

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

    async def completion_stream(self, request: CompletionRequest,
                                disconnected: Disconnected) -> tuple[AsyncIterator[str], str]:
        """The SSE lines of a streamed completion, and the adapter serving it (known at its first event)."""
        prepared = await self.completion_inputs(request)
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
        lines = await self.runner.open_stream(prepared, render, usage if include_usage else None, disconnected)
        return lines, prepared.adapter

    async def chat_inputs(self, request: ChatCompletionRequest) -> Prepared:
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        return self.prepare(request.model, [await self.chat_prompt(request)], request, request.token_limit,
                            "messages", logprobs, n=request.n or 1)

    async def chat(self, request: ChatCompletionRequest, disconnected: Disconnected) -> ChatCompletionResponse:
        prepared = await self.chat_inputs(request)
        results = await self.runner.results(prepared, disconnected)
        return ChatCompletionResponse(
            model=request.model, mhr=AdapterInfo(adapter=_served_by(results, prepared)),
            usage=usage_of(results, prepared.n),
            choices=[ChatChoice(index=i, message=ChatResponseMessage(content=r.text),
                                finish_reason=FINISH_REASONS.get(r.finish_reason),
                                logprobs=None if r.logprobs is None else chat_logprobs(r.logprobs, self.token_text))
                     for i, r in enumerate(results)])

    async def chat_stream(self, request: ChatCompletionRequest,
                          disconnected: Disconnected) -> tuple[AsyncIterator[str], str]:
        """The SSE lines of a streamed chat completion, and the adapter serving it."""
        prepared = await self.chat_inputs(request)
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
        lines = await self.runner.open_stream(prepared, render, usage if include_usage else None, disconnected)
        return lines, prepared.adapter

    async def generate_inputs(self, task: str, request: GenerateRequest) -> Prepared:
        inputs = request.inputs if isinstance(request.inputs, list) else [request.inputs]
        return self.prepare(task, await self.tokenize(inputs, "inputs"), request, request.max_new_tokens, "inputs")

    async def generate_stream(self, task: str, request: GenerateRequest,
                              disconnected: Disconnected) -> tuple[AsyncIterator[str], str]:
        """The SSE lines of a streamed native generation, and the adapter serving it."""
        prepared = await self.generate_inputs(task, request)

        def render(index: int, event: TokenEvent, reason: str | None) -> str:
            return json.dumps({"text": event.text, "finish_reason": reason,
                               "adapter": event.adapter or prepared.adapter})

        lines = await self.runner.open_stream(prepared, render, None, disconnected)
        return lines, prepared.adapter

    async def generate(self, task: str, request: GenerateRequest, disconnected: Disconnected) -> GenerateResponse:
        prepared = await self.generate_inputs(task, request)
        results = await self.runner.results(prepared, disconnected)
        return GenerateResponse(task=task, adapter=_served_by(results, prepared), outputs=[
            GeneratedText(text=r.text, finish_reason=FINISH_REASONS.get(r.finish_reason, r.finish_reason),
                          prompt_tokens=r.prompt_tokens, completion_tokens=len(r.tokens)) for r in results])


def _served_by(results: list[Result], prepared: Prepared) -> str:
    """The adapter that served `results`: the one resolved on acceptance unless the task changed while they
    waited (e.g. it was removed and the zero-shot adapter served them)."""
    served = {r.adapter for r in results if r.adapter}
    return served.pop() if len(served) == 1 else prepared.adapter
