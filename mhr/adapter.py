"""LoRA: the plain low-rank adapter every MHR task collapses to, the unit that is cached, stored and exported.

`MAX_SCALING` and `scale_problem` say which alphas a LoRA may carry into a bundle, an upload or an export.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# The largest LoRA scale alpha / r a bundle, an upload or an import accepts. Trained adapters sit near 1
# (alpha = r or 2r; rsLoRA's alpha / sqrt(r) stays in the tens), so 1e4 is far above any real one, while
# a larger scale multiplies adapter outputs of order 1 towards float16's 65504 within a layer or two:
# such an adapter serves padding and NaN log-probabilities, not text.
MAX_SCALING = 1e4


@dataclass
class LoRA:
    """An ordinary LoRA: per module name, A [*batch, d_in, r] and B [*batch, r, d_out].

    A module's output becomes base(x) + (alpha / rank) * x @ A @ B. Tensors may carry the same leading
    batch dims (one LoRA per task, e.g. from materializing T tasks at once); `select` picks one.
    """

    A: dict[str, Tensor]
    B: dict[str, Tensor]
    alpha: float

    def __post_init__(self) -> None:
        if self.A.keys() != self.B.keys():
            raise ValueError(f"LoRA A and B name different modules: {sorted(self.A.keys() ^ self.B.keys())}")
        if not self.A:
            raise ValueError("a LoRA needs at least one module")
        ranks = {(a.shape[-1], b.shape[-2]) for a, b in zip(self.A.values(), self.B.values(), strict=True)}
        if len({r for pair in ranks for r in pair}) != 1:
            raise ValueError(f"every module of a LoRA must have one rank, found (A, B) ranks {sorted(ranks)}")

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[-1]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def modules(self) -> list[str]:
        return list(self.A)

    def select(self, index: int) -> LoRA:
        """The LoRA at `index` of the leading batch dim."""
        return LoRA({n: a[index] for n, a in self.A.items()}, {n: b[index] for n, b in self.B.items()},
                    self.alpha)

    def to(self, *args, **kwargs) -> LoRA:
        """A copy moved/cast like `Tensor.to`."""
        return LoRA({n: a.to(*args, **kwargs) for n, a in self.A.items()},
                    {n: b.to(*args, **kwargs) for n, b in self.B.items()}, self.alpha)

    def delta_weight(self, name: str) -> Tensor:
        """The dense update of one module in nn.Linear layout [*batch, d_out, d_in]."""
        return (self.A[name] @ self.B[name]).transpose(-1, -2) * self.scaling

    def fingerprint(self) -> str:
        """sha256 hex digest of alpha, module names, shapes, dtypes and values: equal LoRAs, equal digests."""
        h = hashlib.sha256(repr(self.alpha).encode())
        for name in self.A:
            for t in (self.A[name], self.B[name]):
                t = t.detach().contiguous().cpu()
                h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def equal(self, other: LoRA) -> bool:
        """Exact equality of modules, tensors and alpha."""
        return (self.alpha == other.alpha and self.A.keys() == other.A.keys()
                and all(torch.equal(self.A[n], other.A[n]) and torch.equal(self.B[n], other.B[n])
                        for n in self.A))


def scale_problem(alpha: Any, rank: int | None) -> str | None:
    """What makes `alpha` unfit as the alpha of a rank-`rank` LoRA, worded to follow "alpha"; None if fit.

    Fit: a finite number > 0 with alpha / rank <= MAX_SCALING (rank None or 0: the bound is not checked).
    """
    try:
        value = float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else math.nan
    except OverflowError:  # an integer beyond float range (JSON allows any)
        value = math.inf
    if not 0 < value < math.inf:
        return f"must be > 0 and finite, got {alpha!r}"
    if rank and value / rank > MAX_SCALING:
        return (f"must be at most {MAX_SCALING:g} x rank (the LoRA scale alpha / r is bounded), got {alpha!r} "
                f"for rank {rank}")
    return None
