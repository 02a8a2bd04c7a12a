"""What a request asks for: its prompt and task (`Request`), how it generates (`SamplingParams`), and the
checks every engine applies before queueing it (`check_request`).

The contract between the serving layer and both engines; no engine state lives here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from server.engine.tasks import Mixture

MAX_LOGPROBS = 20  # most likely alternatives a request may ask for at each position


class InvalidRequest(ValueError):
    """A request that can never be served as given (bad parameters, too long, unknown task)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. temperature 0 is greedy; top_p 1 keeps the whole distribution.

    logprobs: give each generated token's log-probability and this many likeliest alternatives (None: none).
    prompt_logprobs: the same for every prompt token after the first (scoring a text: max_new_tokens 0).
    presence_penalty, frequency_penalty: subtracted from a token's logit once if the request has generated it,
    and once per time it has (OpenAI's penalties, over the generated tokens as vLLM counts them).
    logit_bias: (token, bias) pairs added to those tokens' logits at every step.
    Penalties and biases change the choice of tokens, not the log-probabilities reported (the model's).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            errors.append(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            errors.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            errors.append(f"stop strings must be non-empty strings, got {self.stop!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                errors.append(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                errors.append(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if any(not isinstance(t, int) or not -100 <= b <= 100 for t, b in self.logit_bias):
            errors.append(f"logit_bias must be (token id, bias in [-100, 100]) pairs, got {self.logit_bias!r}")
        if errors:
            raise InvalidRequest("; ".join(errors))


@dataclass
class Request:
    """One generation request: prompt token ids for `task` (None: the bare backbone)."""

    prompt: list[int]
    task: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    mixture: Mixture | None = None          # a per-request mixture of skills instead of the task's adapter
    arrived: float = field(default_factory=time.monotonic)   # for queue and first-token latencies

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


def check_request(request: Request, max_seq_len: int, ids_in_use, vocab_size: int) -> None:
    """Refuse a request no engine could serve: empty, longer than a sequence may be, a token id (in the prompt
    or a logit bias) outside the vocabulary, or a reused id."""
    n = request.prompt_len
    if n == 0:
        raise InvalidRequest("the prompt is empty")
    tokens = [*request.prompt, *(t for t, _ in request.params.logit_bias)]
    if not all(0 <= t < vocab_size for t in tokens):
        raise InvalidRequest(f"token ids must be in [0, {vocab_size}) (the model's vocabulary), got "
                             f"{[t for t in tokens if not 0 <= t < vocab_size][:5]}")
    if n + request.params.max_new_tokens > max_seq_len:
        raise InvalidRequest(f"prompt ({n} tokens) + max_new_tokens ({request.params.max_new_tokens}) "
                             f"exceeds max_seq_len {max_seq_len}")
    if request.request_id in ids_in_use:
        raise InvalidRequest(f"request id {request.request_id!r} is already in use")
