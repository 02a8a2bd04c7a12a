"""Request and sequence state, the running batch, and per-request sampling.

Owns what a request asks for (`SamplingParams`, `Request`), what it has produced so far (`Sequence`),
the running batch in KV-row order with its per-row slot plan (`Batch`), and choosing next tokens.
Each sampled request draws from its own torch.Generator, so its tokens do not depend on its neighbours.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.lora_ops import SlotPlan
from server.outputs import Result, TokenLogprobs
from server.prefix_cache import PrefixKV
from server.tasks import Mixture

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


@dataclass
class Sequence:
    """A running request: its adapter slot, generated tokens and text, and its sampler."""

    request: Request
    slot: int
    adapter: str                       # which adapter serves it: the task, "zero-shot" or "base"
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None   # "length", "stop", "eos" or "cancelled" once finished
    started: float = field(default_factory=time.monotonic)     # when it joined the running batch
    first_token_at: float | None = None
    last_token_at: float | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)                # when asked: one per token
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # when asked: one per prompt token
    cache_key: Hashable = None         # the adapter's key, under which its prompt prefixes are cached
    prefix: PrefixKV | None = None     # a cached prefix of the prompt to load into its KV row, until prefilled
    reused: int = 0                    # prompt positions that prefix covers (not prefilled)
    _prefix: int = 0                   # the text of tokens[:_read] is in `text`; decoding restarts at _prefix
    _read: int = 0

    def append(self, token: int, eos_ids: frozenset[int], decode: Callable[[list[int]], str] | None) -> str:
        """Record a generated token and set `finish_reason` if it ends the request; returns the new text.

        Text (and so stop strings) needs `decode`. A trailing partial character (a multi-byte
        character split across tokens) is held back until the token that completes it. Only a short window
        of tokens is decoded per call, not the whole list (which grew quadratic in the output length).
        """
        self.tokens.append(token)
        self.last_token_at = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = self.last_token_at
        params = self.request.params
        delta = ""
        if decode is not None:
            delta = self._new_text(decode)
            self.text += delta
        if delta and params.stop:
            delta = self._cut_at_stop(delta)
        if self.finish_reason is None:
            if token in eos_ids and not params.ignore_eos:
                self.finish_reason = "eos"
            elif len(self.tokens) >= params.max_new_tokens:
                self.finish_reason = "length"
        return delta

    def result(self, finish_reason: str | None = None, error: str | None = None, started: bool = True) -> Result:
        """The request's result: what it generated, why it ended (`finish_reason`, else the sequence's own, else
        "error"), its latencies (queue time only if it `started` running) and the log-probabilities it asked for."""
        request, params = self.request, self.request.params
        first = None if self.first_token_at is None else self.first_token_at - request.arrived
        after_first = self.last_token_at - self.first_token_at if len(self.tokens) > 1 else None
        return Result(request.request_id, self.adapter, list(self.tokens), self.text,
                      finish_reason or self.finish_reason or "error", request.prompt_len, error=error,
                      queue_seconds=self.started - request.arrived if started else None, first_token_seconds=first,
                      after_first_token_seconds=after_first,
                      logprobs=None if params.logprobs is None else list(self.logprobs),
                      prompt_logprobs=None if params.prompt_logprobs is None else list(self.prompt_logprobs))

    def score_prompt(self, logits: Tensor, start: int) -> None:
        """Record the log-probabilities of the prompt tokens that `logits` [L, vocab], at prompt positions start,
        start + 1, ..., predict (the next token of each, within the prompt); the first prompt token gets None."""
        if start == 0:
            self.prompt_logprobs.append(None)
        targets = self.request.prompt[start + 1:start + 1 + len(logits)]
        if targets:
            self.prompt_logprobs += token_logprobs(logits[:len(targets)], targets, self.request.params.prompt_logprobs)

    def _new_text(self, decode: Callable[[list[int]], str]) -> str:
        """The text the tokens since `_read` add (TGI's and vLLM's prefix/read offsets): decode the window
        from `_prefix` with and without them and keep the difference, so that whatever a tokenizer does at
        the start of a decoded string (dropping a leading space, say) happens to both and cancels."""
        before = decode(self.tokens[self._prefix:self._read]) if self._read > self._prefix else ""
        after = decode(self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""                 # nothing visible yet, or a character still incomplete: wait
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before):]

    def _cut_at_stop(self, delta: str) -> str:
        """End the text before the first stop string that the new text completes."""
        start = len(self.text) - len(delta)
        hits = [i for s in self.request.params.stop
                if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if not hits:
            return delta
        end = min(hits)
        self.text, self.finish_reason = self.text[:end], "stop"
        return delta[: max(0, end - start)]


def prefill_groups(lengths: list[int], max_padding: float) -> list[list[int]]:
    """Which prompts to prefill together: indices, longest first, grouped so that right-padding a group to
    its longest prompt adds at most `max_padding` of its real tokens (padding is computed and thrown away;
    0: only prompts of one length share a group)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= (1 + max_padding) * (total + lengths[i]):
            groups[-1].append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """The request's own random stream (None for greedy): seeded, else from fresh OS entropy."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def next_tokens(logits: Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row: greedy rows by argmax, sampled rows from their own generators, each after its own
    logit biases and penalties.

    logits [n, vocab] (row i belongs to seqs[i]).
    """
    tokens = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        params = seq.request.params
        shaped = bool(params.logit_bias or seq.tokens and (params.presence_penalty or params.frequency_penalty))
        row = _shaped(logits[i], seq) if shaped else logits[i]
        if seq.generator is not None:
            tokens[i] = _sample(row, params, seq.generator)
        elif shaped:
            tokens[i] = int(row.argmax())
    return tokens


def _shaped(logits: Tensor, seq: Sequence) -> Tensor:
    """A row's logits [vocab] (as float32, a copy) with the request's logit biases added and its presence and
    frequency penalties subtracted for the tokens it has generated."""
    params, row = seq.request.params, logits.float().clone()
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias, strict=True)
        row[list(ids)] += torch.tensor(biases, device=row.device)
    if seq.tokens and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(seq.tokens, device=row.device), minlength=row.numel()).float()
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return row


def token_logprobs(logits: Tensor, tokens: list[int], top: int) -> list[TokenLogprobs]:
    """Each row's log-probability of `tokens[i]` and its `top` likeliest tokens; logits [n, vocab]. A row's values
    depend on that row alone (the same bits in any batch)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprobs(t, lp) for t, lp in zip(tokens, chosen, strict=True)]
    values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return [TokenLogprobs(t, lp, tuple(zip(i, v, strict=True)))
            for t, lp, i, v in zip(tokens, chosen, ids.tolist(), values.tolist(), strict=True)]


def _sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)              # [vocab]
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


class Batch:
    """The running sequences in KV-cache row order (row i is seqs[i]), with their slot plan.

    The plan is rebuilt only when the batch changes, not at every decode step.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.seqs: list[Sequence] = []
        self._plan: SlotPlan | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    def extend(self, seqs: list[Sequence]) -> None:
        self.seqs.extend(seqs)
        self._plan = None

    def remove_row(self, row: int) -> None:
        """Drop row `row`; the last sequence takes its place (as the KV cache moves the last row)."""
        last = self.seqs.pop()
        if row < len(self.seqs):
            self.seqs[row] = last
        self._plan = None

    def plan(self) -> SlotPlan:
        if self._plan is None:
            self._plan = SlotPlan.of([s.slot for s in self.seqs], self.device)
        return self._plan

    def last_tokens(self) -> Tensor:
        """The token each row feeds to the next decode step [n, 1]."""
        return torch.tensor([[s.tokens[-1]] for s in self.seqs], device=self.device)
