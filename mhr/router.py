"""Router: the per-task routing logits of one adapted layer, and their conversion to mixing weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mhr.functional import routing_weights


class Router(nn.Module):
    """Holds routing logits [T, h, K] and maps task ids to mixing weights [..., h, K].

    In training with `relaxed=True` the weights are relaxed-Bernoulli samples; otherwise sigmoid.
    """

    def __init__(self, n_tasks: int, n_heads: int, n_skills: int, *, relaxed: bool = True,
                 temperature: float = 1.0) -> None:
        super().__init__()
        if n_tasks < 0:
            raise ValueError(f"n_tasks must be >= 0, got {n_tasks}")
        self.relaxed = relaxed
        self.temperature = temperature
        self.logits = nn.Parameter(torch.empty(n_tasks, n_heads, n_skills))
        self.reset_parameters()

    @property
    def n_tasks(self) -> int:
        return self.logits.shape[0]

    def reset_parameters(self) -> None:
        # Near-zero logits: every skill starts half-on in every head, i.e. close to the uniform mixture.
        nn.init.uniform_(self.logits, -1e-3, 1e-3)

    def forward(self, task_ids: Tensor) -> Tensor:
        """task_ids: integer tensor of any shape -> weights [*task_ids.shape, h, K]."""
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.n_tasks):
            raise IndexError(
                f"task id out of range: got ids in [{int(task_ids.min())}, {int(task_ids.max())}], "
                f"this router holds {self.n_tasks} task(s)"
            )
        logits = self.logits[task_ids.to(self.logits.device)]
        return routing_weights(logits, sample=self.training and self.relaxed,
                               temperature=self.temperature)

    def extra_repr(self) -> str:
        T, h, K = self.logits.shape
        return f"n_tasks={T}, n_heads={h}, n_skills={K}, relaxed={self.relaxed}"
