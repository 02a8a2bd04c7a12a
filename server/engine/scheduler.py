"""Admission: the bounded waiting queue and which waiting requests join the running batch at a step.

Plain Python, no torch. Owns the FIFO of waiting requests and the admission policy under the budgets
(running rows, prompt tokens prefilled per step, adapter slots through the engine's `try_start`).
The running batch itself is the engine's (`server.engine.sequence.Batch`), which reports only its size here.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: retry later (HTTP 429/503). Raised at once, never blocks."""


class Waiting(Protocol):
    request_id: str
    prompt_len: int


class Start(enum.Enum):
    """What `try_start` did with a waiting request."""

    STARTED = "started"   # it joined the running batch
    WAIT = "wait"         # no adapter slot now: it keeps its place, later requests may still start
    DROPPED = "dropped"   # it failed (e.g. its task was removed): taken off the queue


class Scheduler:
    """FIFO admission under row, prefill-token and slot budgets.

    Args:
        max_waiting: bound of the waiting queue.
        max_running: rows of the running batch.
        max_prefill_tokens: prompt tokens admitted per step; the first request of a step always fits (a
            longer one starts alone: the engine prefills it in chunks).
    """

    def __init__(self, max_waiting: int, max_running: int, max_prefill_tokens: int) -> None:
        self.max_waiting, self.max_running, self.max_prefill_tokens = max_waiting, max_running, max_prefill_tokens
        self._waiting: deque[Waiting] = deque()
        self._lock = threading.Lock()  # submit/cancel come from other threads than the step loop

    def submit(self, request: Waiting) -> None:
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the bound): retry later")
            self._waiting.append(request)

    def remove(self, request_id: str) -> Waiting | None:
        """Take a waiting request off the queue (cancellation); None when it is not waiting."""
        with self._lock:
            for request in self._waiting:
                if request.request_id == request_id:
                    self._waiting.remove(request)
                    return request
        return None

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    def admit(self, n_running: int, try_start: Callable[[Waiting], Start], budget: int | None = None
              ) -> list[Waiting]:
        """Start waiting requests in FIFO order while rows and the step's prefill budget last.

        budget: prompt tokens this step may admit, every request included (a step that also prefills a
        chunk of a long prompt gives part of its budget); by default `max_prefill_tokens`, which the first
        request may exceed (it is then prefilled in chunks).
        A request that must wait for a slot keeps its place; later ones are still tried, since they may
        hit adapters already resident. The oldest request gets the first slot released, so none starves.
        """
        with self._lock:
            candidates = list(self._waiting)
        started, tokens, rows = [], 0, self.max_running - n_running
        limit = self.max_prefill_tokens if budget is None else budget
        for request in candidates:
            if len(started) == rows or ((started or budget is not None) and tokens + request.prompt_len > limit):
                break
            outcome = try_start(request)
            if outcome is Start.WAIT:
                continue
            with self._lock:
                self._waiting.remove(request)
            if outcome is Start.STARTED:
                started.append(request)
                tokens += request.prompt_len
        return started
