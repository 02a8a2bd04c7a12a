"""Instant routing: a new task's routing chosen from a few examples by forward passes alone, no gradient.

The examples' loss (mean negative log-likelihood of their answers' tokens, as `mhr adapt` trains on) is scored
under each routed task's routing and under the uniform mixture (MHR-μ's); then mixtures of the three best are
searched on a grid of the simplex, refined around the best point with a halved step while the budget lasts
(the gradient-free composition of LoraHub, over routing weights). Every candidate is an ordinary per-request
mixture (`server.engine.tasks.Mixture`) scored through the engine like any request, so the search shares the
engine with live traffic, a batch of at most `max_running` requests at a time. The winner's weights become
routing logits, so the new task is a routed task like any other.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.contract import ServingEngine
from server.engine.requests import Request, SamplingParams
from server.engine.tasks import Mixture
from training.data import IGNORE, Example, encode

MAX_CANDIDATES = 64   # routed tasks scored one by one; a larger bundle is sampled (seeded)
TOP = 3               # the best candidates whose mixtures are searched
SCORE = SamplingParams(max_new_tokens=0, prompt_logprobs=0)  # log-probabilities of the prompt, nothing generated


@dataclass
class RouteResult:
    """The routing found: logits [h, K] per module, what it mixes (task -> share, or "uniform" -> 1), the
    examples' loss under it and under the adapter that served the name before, and what the search cost."""

    logits: dict[str, Tensor]
    mixture: dict[str, float]
    loss_before: float
    loss_after: float
    evaluations: int
    seconds: float


def encode_whole(tokenizer, example: Example) -> tuple[list[int], int]:
    """The example's tokens as the adapters are trained on them (`training.data.encode`, never truncated), and how
    many of its last tokens are the answer's."""
    encoded = encode(tokenizer, example, 0, max_length=2**62)
    return encoded.input_ids, sum(label != IGNORE for label in encoded.labels)


def weights_to_logits(weights: Mapping[str, Tensor], floor: float = 1e-6) -> dict[str, Tensor]:
    """Routing logits whose evaluation weights (sigmoid, normalised per head) are `weights` [h, K] per module, up
    to `floor`: each head's gates are its weights scaled so that the largest is just under 1."""
    logits = {}
    for module, w in weights.items():
        gates = (w / w.amax(dim=-1, keepdim=True)).clamp(floor, 1 - floor)
        logits[module] = torch.logit(gates).float()
    return logits


class RouteSearch:
    """Scores mixtures of `engine`'s routed tasks on tokenized examples; `run` searches them."""

    def __init__(self, engine: ServingEngine, examples: list[Example], budget: int, seed: int = 0) -> None:
        self.engine, self.budget, self.seed = engine, budget, seed
        self.encoded = [encode_whole(engine.tokenizer, e) for e in examples]
        self.evaluations = 0

    async def run(self, task: str) -> RouteResult:
        started = time.monotonic()
        loss_before = await self._loss(task=task)  # what serves the name now (its routing, or the zero-shot adapter)
        tasks = self.engine.tasks
        routed = tasks.routed_names
        if len(routed) > MAX_CANDIDATES:
            routed = random.Random(self.seed).sample(routed, MAX_CANDIDATES)
        scored = {(t,): await self._loss(mixture=tasks.mixture({t: 1.0})) for t in routed}
        scored[()] = await self._loss(mixture=tasks.uniform_mixture())
        best = min(scored, key=scored.get)
        top = sorted((c for c in scored if c), key=scored.get)[:TOP]
        shares, loss = ({best[0]: 1.0} if best else {}), scored[best]
        if len(top) > 1:
            names = [t for (t,) in top]
            point, point_loss = await self._simplex_search(names)
            if point_loss < loss:
                shares, loss = point, point_loss
        mixture = tasks.mixture(shares) if shares else tasks.uniform_mixture()
        return RouteResult(weights_to_logits(mixture.weights), shares or {"uniform": 1.0}, loss_before, loss,
                           self.evaluations, time.monotonic() - started)

    async def _simplex_search(self, names: list[str]) -> tuple[dict[str, float], float]:
        """The best mixture of `names` on a grid of step 1/4, refined around the best point with halved steps, `budget`
        mixtures at most ({} and infinity for none)."""
        tried: dict[tuple[float, ...], float] = {}
        step, centre = 0.25, None
        while len(tried) < self.budget and step >= 1 / 32:
            points = _grid(len(names), step) if centre is None else _around(centre, step)
            for point in points:
                if point in tried or len(tried) >= self.budget:
                    continue
                shares = {n: p for n, p in zip(names, point, strict=True) if p > 0}
                tried[point] = await self._loss(mixture=self.engine.tasks.mixture(shares))
            if not tried:
                break
            centre, step = min(tried, key=tried.get), step / 2
        if not tried:  # no budget for mixtures
            return {}, float("inf")
        best = min(tried, key=tried.get)
        return {n: p for n, p in zip(names, best, strict=True) if p > 0}, tried[best]

    async def _loss(self, task: str | None = None, mixture: Mixture | None = None) -> float:
        """Mean negative log-likelihood of the examples' answer tokens under `task`'s adapter or `mixture`."""
        self.evaluations += 1
        total, count = 0.0, 0
        batch = max(1, self.engine.config.max_running)
        for start in range(0, len(self.encoded), batch):
            chunk = self.encoded[start:start + batch]
            handles = [self.engine.submit(Request(ids, task, SCORE, mixture=mixture)) for ids, _ in chunk]
            for (_, n_answer), handle in zip(chunk, handles, strict=True):
                result = await handle.wait()
                if result.finish_reason == "error":
                    raise RuntimeError(f"scoring an example failed: {result.error}")
                total -= sum(lp.logprob for lp in result.prompt_logprobs[-n_answer:])
                count += n_answer
        return total / count


def _grid(n: int, step: float) -> list[tuple[float, ...]]:
    """Points of the simplex of `n` shares whose coordinates are multiples of `step`."""
    k = round(1 / step)
    return [tuple(c * step for c in combo) for combo in itertools.product(range(k + 1), repeat=n) if sum(combo) == k]


def _around(centre: tuple[float, ...], step: float) -> list[tuple[float, ...]]:
    """The simplex points next to `centre`: `step` moved from one share to another."""
    out = []
    for i, j in itertools.permutations(range(len(centre)), 2):
        if centre[i] >= step:
            point = list(centre)
            point[i], point[j] = point[i] - step, point[j] + step
            out.append(tuple(round(p, 6) for p in point))
    return out
