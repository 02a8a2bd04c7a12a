"""Running prepared requests on the engine: whole results, SSE streams, cancellation and counting.

Owns a request's life after the serving logic has built it (`Prepared`): submitting it, waiting for its result
or streaming its events, cancelling it when the client goes away, counting every request once in the metrics
with the adapter that served it and how it ended, and the drain deadline of a shutdown (`cut_streams`): open
streams then end with an error event, waiting responses with a 503. A stream's head waits for its first
event, so that it names the adapter that serves it and a request that fails before its first token gets an
error status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from server.engine.contract import ServingEngine
from server.engine.outputs import RequestHandle, Result, TokenEvent
from server.engine.requests import InvalidRequest, Request
from server.engine.scheduler import QueueFull
from server.engine.tasks import MIXTURE_PREFIX, UnknownTask
from server.http.errors import APIError
from server.http.metrics import ServerMetrics
from server.http.protocol import Usage

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
_CUT = object()  # put in an open stream's queue at the drain deadline

Disconnected = Callable[[], Awaitable[bool]]
Render = Callable[[int, TokenEvent, "str | None"], str]  # (choice index, event, finish reason) -> an SSE payload


@dataclass
class Prepared:
    """Engine requests ready to submit, with the adapter that will serve them."""

    requests: list[Request]   # n a prompt, prompt after prompt
    adapter: str              # resolved on acceptance; a stream sets it to its first event's
    n: int = 1  # choices per prompt


def metrics_label(adapter: str) -> str:
    """The metrics label of an adapter: per-request mixtures share one, so clients cannot mint new series."""
    return "mix" if adapter.startswith(MIXTURE_PREFIX) else adapter


class Runner:
    """Runs prepared requests on `engine`, counting them in `metrics`."""

    def __init__(self, engine: ServingEngine, metrics: ServerMetrics) -> None:
        self.engine, self.metrics = engine, metrics
        self._open_streams: set[asyncio.Queue] = set()
        self._cut: asyncio.Event | None = None  # set at the drain deadline

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

    async def open_stream(self, prepared: Prepared, render: Render,
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
                     render: Render,
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
                yield _sse(usage(usage_of(results, prepared.n)))
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


def usage_of(results: list[Result], n: int = 1) -> Usage:
    """Token counts of a response: each prompt once (its `n` choices share it), every choice's completion."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(len(r.tokens) for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


async def _until(disconnected: Disconnected, every: float = 0.25) -> None:
    while not await disconnected():
        await asyncio.sleep(every)
