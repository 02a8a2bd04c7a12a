"""Choosing each running request's next token from its logits: penalties and biases, temperature and top-p,
greedy or sampled. Each sampled request draws from its own torch.Generator, so its tokens do not depend on
its neighbours; the log-probabilities reported are the model's, before any shaping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from server.engine.outputs import TokenLogprobs
from server.engine.requests import SamplingParams

if TYPE_CHECKING:
    from server.engine.sequence import Sequence


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
