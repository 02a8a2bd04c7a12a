"""What the engine hands back for a request: token events, the final result, and the handle delivering them.

A handle delivers to three kinds of consumer at once: a plain callback (called on the engine's step
thread), an asyncio consumer (`async for event in handle`, `await handle.wait()`), and a blocking one
(`handle.result(timeout)`). The engine knows nothing of HTTP; the API layer consumes these.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.engine.prefix_cache import PrefixStats
from server.engine.slots import CacheStats


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model at its position (the log-softmax of the logits, before
    temperature and top-p), and the `top` most likely tokens there as (token, log-probability), likeliest first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; `finish_reason` is set on the request's last event."""

    request_id: str
    token: int | None          # None only on a last event that carries no token (cancelled, error, no tokens asked)
    text: str                  # text this token adds (empty without a tokenizer, or held back)
    finish_reason: str | None = None
    logprobs: TokenLogprobs | None = None   # when the request asked for them (`SamplingParams.logprobs`)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the first event, when asked (`prompt_logprobs`)
    adapter: str = ""          # the adapter that produced it (the task, "zero-shot", ...); "" if none did


@dataclass
class Result:
    """A finished request. finish_reason: "length", "stop", "eos", "cancelled" or "error"."""

    request_id: str
    adapter: str                   # which adapter served it: the task, "zero-shot", "base"; "" if none did
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    error: str | None = None
    queue_seconds: float | None = None        # arrival -> joining the running batch (None: never ran)
    first_token_seconds: float | None = None  # arrival -> first generated token
    after_first_token_seconds: float | None = None  # first -> last generated token (None: fewer than two)
    logprobs: list[TokenLogprobs] | None = None  # one per token, when asked (`SamplingParams.logprobs`)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # one per prompt token (the first: None), when asked


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and counters, plain values (only `server.http.metrics` knows Prometheus)."""

    running: int          # requests in the running batch, and a long prompt being prefilled in chunks
    waiting: int          # requests queued for admission
    slots: int            # adapter slots per layer, slot 0 included
    slots_in_use: int     # slots holding an adapter (the zero-shot pin included)
    tasks: int            # tasks served from the bundle
    steps: int            # engine steps that did work
    batch_rows: int       # rows given a token, summed over steps (/ steps: mean batch size)
    cache: CacheStats     # a copy of the adapter cache's counters
    prefix: PrefixStats | None = None  # a copy of the prefix cache's counters, when it is on


class RequestHandle:
    """The consumer's side of one request. Create it on the thread (and event loop) that consumes it."""

    def __init__(self, request_id: str, on_event: Callable[[TokenEvent], None] | None = None) -> None:
        self.request_id = request_id
        self._on_event = on_event
        self._done = threading.Event()
        self._result: Result | None = None
        self._consumed = False  # the async consumer has seen the last event
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._queue: asyncio.Queue[TokenEvent] | None = asyncio.Queue()
        except RuntimeError:  # no running loop: callback and blocking consumers only
            self._loop, self._queue = None, None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def emit(self, event: TokenEvent) -> None:
        """Deliver an event (engine side; any thread)."""
        if self._on_event is not None:
            self._on_event(event)
        if self._queue is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def finish(self, result: Result, last: TokenEvent) -> None:
        """Store the result, then deliver the last event (engine side): whoever sees it can read the result."""
        self._result = result
        self.emit(last)
        self._done.set()

    def result(self, timeout: float | None = None) -> Result:
        """Block until the request finishes (for consumers off the event loop)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self._result

    async def wait(self) -> Result:
        """The result, consuming events that nobody iterated."""
        if not self._consumed:
            async for _ in self:
                pass
        return self._result

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._queue is None:
            raise RuntimeError("this handle was created outside an event loop: use result() or a callback")
        while True:
            event = await self._queue.get()
            if event.finish_reason is not None:
                self._consumed = True
            yield event
            if self._consumed:
                return
