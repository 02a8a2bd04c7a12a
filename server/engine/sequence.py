"""A running request's state (`Sequence`: its slot, tokens, text, stop strings) and the running batch in KV-row
order with its per-row slot plan (`Batch`); how new prompts are grouped for prefill (`prefill_groups`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.engine.outputs import Result, TokenLogprobs
from server.engine.prefix_cache import PrefixKV
from server.engine.requests import Request
from server.engine.sampling import token_logprobs
from server.model.lora_ops import SlotPlan


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
