"""Pure tensor math of multi-head routing: logits -> weights, skills -> a task's LoRA, the LoRA delta.

Shapes (K skills, h heads, r rank, T tasks, leading `...` for stacked layers):
    routing logits / weights   [..., T, h, K]
    inventory lora_A           [..., K, h, d_in / h, r]
    inventory lora_B           [..., K, h, r, d_out / h]
    task LoRA  A               [..., T, d_in, r]       (heads concatenated along d_in)
    task LoRA  B               [..., T, r, d_out]      (heads concatenated along d_out)
A task's update is the full rank-r matrix A @ B (not block-diagonal): heads only decide which skills
fill which block of rows of A and columns of B.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

EPS = 1e-12  # added to the per-head sum of weights, as in the reference implementations


def routing_weights(logits: Tensor, *, sample: bool = False, temperature: float = 1.0) -> Tensor:
    """Mixing weights from routing logits [..., h, K] -> [..., h, K].

    Each (task, head) gets independent per-skill gates, sigmoid(logits) or, when `sample`, a relaxed
    Bernoulli (Gumbel-sigmoid) sample of them; the gates are then normalised over skills. No softmax:
    a head may switch several skills fully on.
    """
    if sample:
        gates = RelaxedBernoulli(torch.tensor(temperature, device=logits.device), logits=logits).rsample()
    else:
        gates = torch.sigmoid(logits)
    return gates / (gates.sum(dim=-1, keepdim=True) + EPS)


def uniform_weights(n_heads: int, n_skills: int, **tensor_kwargs) -> Tensor:
    """The MHR-mu mixture [h, K]: every head averages every skill."""
    return torch.full((n_heads, n_skills), 1.0 / n_skills, **tensor_kwargs)


def join_heads(A_heads: Tensor, B_heads: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate per-head blocks into a plain LoRA.

    A_heads [..., h, d_in/h, r] -> A [..., d_in, r];  B_heads [..., h, r, d_out/h] -> B [..., r, d_out].
    """
    *lead, h, d_in_h, r = A_heads.shape
    d_out_h = B_heads.shape[-1]
    A = A_heads.reshape(*lead, h * d_in_h, r)
    B = B_heads.transpose(-3, -2).reshape(*lead, r, h * d_out_h)  # [..., r, h, d_out/h] -> [..., r, d_out]
    return A, B


def heads_first(skills: Tensor) -> Tensor:
    """Skills [..., K, h, x, y] -> [..., h, K, x, y] (a view): each head's K blocks side by side, the layout
    `mix_heads` reads. Serving keeps its inventory stored this way (made contiguous once)."""
    return skills.transpose(-4, -3)


def mix_heads(weights: Tensor, skills: Tensor) -> Tensor:
    """The mixing of MHR, the one implementation every path uses: per task and head, the weighted sum of the
    skills' blocks.

    weights [..., T, h, K], skills [..., h, K, x, y] (`heads_first`) -> [..., T, h, x, y]; one batched
    matmul over (..., head).
    """
    x, y = skills.shape[-2:]
    mixed = weights.to(skills.dtype).transpose(-3, -2) @ skills.flatten(-2)  # [..., h, T, K] @ [..., h, K, x*y]
    return mixed.transpose(-3, -2).unflatten(-1, (x, y))                    # [..., T, h, x, y]


def mix_skills(weights: Tensor, lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor]:
    """Materialize task LoRAs from mixing weights.

    weights [..., T, h, K], lora_A [..., K, h, d_in/h, r], lora_B [..., K, h, r, d_out/h]
    -> A [..., T, d_in, r], B [..., T, r, d_out]. The same weights mix A and B.
    """
    return join_heads(mix_heads(weights, heads_first(lora_A)), mix_heads(weights, heads_first(lora_B)))


def average_skills(lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor]:
    """The MHR-mu adapter, the uniform mixture of the skills -> A [..., d_in, r], B [..., r, d_out]."""
    K, h = lora_A.shape[-4:-2]
    uniform = uniform_weights(h, K, dtype=lora_A.dtype, device=lora_A.device)[None]  # one task: [1, h, K]
    A, B = mix_skills(uniform, lora_A, lora_B)
    return A.select(-3, 0), B.select(-3, 0)


def lora_delta(x: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """The adapter's contribution scaling * x @ A @ B.

    x [N, ..., d_in] with either one LoRA for all rows (A [d_in, r], B [r, d_out]) or one per row
    (A [N, d_in, r], B [N, r, d_out]) -> [N, ..., d_out].
    """
    if A.dim() == 2:
        return (x @ A.to(x.dtype)) @ B.to(x.dtype) * scaling
    rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, L, d_in]: every leading dim but the first flattened
    out = torch.bmm(torch.bmm(rows, A.to(x.dtype)), B.to(x.dtype)) * scaling
    return out.reshape(*x.shape[:-1], B.shape[-1])
