"""Plain, loop-based references for the MHR math, written from docs/architecture.md, "The math" (not from mhr/).

Everything here runs in float64 with explicit Python loops over heads, skills and rows, so a test that
compares mhr's vectorised float32 code against it checks the math, not the code against itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

EPS = 1e-12


def eval_weights(logits: Tensor) -> Tensor:
    """Evaluation mixing weights of one task [h, K]: sigmoid, then normalised over skills."""
    gates = torch.sigmoid(logits.detach().double())
    h, K = gates.shape
    w = torch.empty_like(gates)
    for j in range(h):
        total = sum(gates[j, k] for k in range(K))
        for k in range(K):
            w[j, k] = gates[j, k] / (total + EPS)
    return w


def task_lora(lora_A: Tensor, lora_B: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """A_t [d_in, r], B_t [r, d_out] of one task from inventory A [K, h, d_in/h, r], B [K, h, r, d_out/h].

    Rows of head j of A_t are sum_k w[j, k] A[k, j]; columns of head j of B_t are sum_k w[j, k] B[k, j].
    """
    A, B, w = lora_A.detach().double(), lora_B.detach().double(), w.double()
    K, h, d_in_h, r = A.shape
    d_out_h = B.shape[-1]
    A_t = torch.zeros(h * d_in_h, r, dtype=torch.float64)
    B_t = torch.zeros(r, h * d_out_h, dtype=torch.float64)
    for j in range(h):
        for k in range(K):
            A_t[j * d_in_h:(j + 1) * d_in_h, :] += w[j, k] * A[k, j]
            B_t[:, j * d_out_h:(j + 1) * d_out_h] += w[j, k] * B[k, j]
    return A_t, B_t


def routed_task_lora(layer: nn.Module, task: int) -> tuple[Tensor, Tensor]:
    """The evaluation-mode LoRA of `task` in an MHRLinear, from its raw parameters."""
    return task_lora(layer.lora_A, layer.lora_B, eval_weights(layer.router.logits[task]))


def linear_with_lora(x: Tensor, weight: Tensor, bias: Tensor | None, A_t: Tensor, B_t: Tensor,
                     scaling: float) -> Tensor:
    """x [..., d_in] -> x W^T + b + scaling * x A_t B_t, in float64."""
    x, W = x.detach().double(), weight.detach().double()
    y = x @ W.T + scaling * (x @ A_t.double() @ B_t.double())
    return y if bias is None else y + bias.detach().double()


def routed_forward(layer: nn.Module, x: Tensor, row_tasks: list[int]) -> Tensor:
    """Evaluation-mode output of an MHRLinear, one example (first dim of x) at a time."""
    rows = []
    for i, task in enumerate(row_tasks):
        A_t, B_t = routed_task_lora(layer, task)
        rows.append(linear_with_lora(x[i], layer.base.weight, layer.base.bias, A_t, B_t, layer.scaling))
    return torch.stack(rows)


@torch.no_grad()
def randomize(layer: nn.Module, generator: torch.Generator) -> None:
    """Give an MHRLinear nonzero B (it starts at zero) and logits far from zero (they start near it)."""
    layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
    layer.router.logits.copy_(torch.randn(layer.router.logits.shape, generator=generator) * 2.0)
