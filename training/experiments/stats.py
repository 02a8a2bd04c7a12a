"""Paired bootstrap confidence intervals of a difference between two methods, over seeds, tasks and instances.

A run's result is a score per test instance, so the scores of one method are an array
[pre-training seeds P, few-shot seeds F, tasks T, instances N]; two methods are paired cell by cell (the
same inventory seed, subset of shots, task and test word). The difference is averaged over few-shot
seeds, then resampled hierarchically: pre-training seeds, tasks, and instances within each drawn task,
each with replacement. So the interval counts the variation between inventories, between tasks and
between test words; a difference that one lucky seed or task carries comes out wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided bootstrap percentile interval."""

    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "half_width": self.half_width}

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def bootstrap(scores: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """The mean of `scores` [P, F, T, N] (e.g. one method's minus another's) and its bootstrap interval."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 4 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty [seeds, few-shot seeds, tasks, instances] array, "
                         f"got shape {scores.shape}")
    cells = scores.mean(axis=1)  # [P, T, N]: few-shot seeds averaged within a pairing
    P, T, N = cells.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, P, size=(n_boot, P))
    tasks = rng.integers(0, T, size=(n_boot, T))
    words = rng.integers(0, N, size=(n_boot, T, N))
    # per drawn (task, words) sample and every seed: mean over the sample -> [P, n_boot]
    per_seed = cells[:, tasks[:, :, None], words].mean(axis=(2, 3))
    means = per_seed[seeds, np.arange(n_boot)[:, None]].mean(axis=1)  # seeds drawn per replicate
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(cells.mean()), float(low), float(high))


def paired(a: np.ndarray, b: np.ndarray, **kwargs) -> Interval:
    """The interval of mean(a - b), paired cell by cell (arrays of the same [P, F, T, N] shape)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same shape, got {a.shape} and {b.shape}")
    return bootstrap(a - b, **kwargs)
