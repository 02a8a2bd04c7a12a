"""Routing math against loop-based float64 references (tests/mhr/reference.py)."""

import pytest
import torch

from mhr.functional import (
    average_skills,
    join_heads,
    lora_delta,
    mix_skills,
    routing_weights,
    uniform_weights,
)
from tests.mhr import reference

SHAPES = [(1, 3, 8, 12, 2), (2, 3, 8, 12, 1), (4, 2, 8, 12, 3), (4, 5, 16, 4, 2)]  # h, K, d_in, d_out, r


def inventory(h, K, d_in, d_out, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(K, h, d_in // h, r, generator=g), torch.randn(K, h, r, d_out // h, generator=g))


@pytest.mark.parametrize("h, K", [(1, 1), (1, 4), (3, 2), (4, 8)])
def test_routing_weights_eval_is_normalised_sigmoid(h, K):
    logits = torch.randn(5, h, K, generator=torch.Generator().manual_seed(h * K)) * 3
    w = routing_weights(logits)
    assert w.shape == (5, h, K)
    for t in range(5):
        torch.testing.assert_close(w[t].double(), reference.eval_weights(logits[t]), rtol=1e-6, atol=1e-7)


def test_routing_weights_no_softmax():
    # Two skills fully on in one head share it equally, whatever the third (off) skill does.
    w = routing_weights(torch.tensor([[30.0, 30.0, -30.0]]))
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0.0]]), atol=1e-6, rtol=0)


def test_routing_weights_sampled_is_random_normalised_and_differentiable():
    logits = torch.zeros(4, 3, 5, requires_grad=True)
    torch.manual_seed(0)
    a = routing_weights(logits, sample=True)
    b = routing_weights(logits, sample=True)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, routing_weights(logits))
    torch.testing.assert_close(a.sum(-1), torch.ones(4, 3))
    assert (a >= 0).all()
    torch.manual_seed(0)
    torch.testing.assert_close(routing_weights(logits, sample=True), a)  # seeded: reproducible
    (a * torch.randn_like(a)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
def test_routing_weights_sampled_follow_the_gumbel_sigmoid_law(temperature):
    # With K = 2, skill 0 outweighs skill 1 iff l0 + L0 > l1 + L1 with L0, L1 standard logistic noise
    # (the gates are sigmoid((l + L) / tau), monotone in l + L). Estimate that probability with our own
    # logistic samples and compare with the frequency in routing_weights' samples.
    n = 20000
    l0, l1 = 0.8, -0.4
    logits = torch.tensor([l0, l1]).expand(n, 2)
    torch.manual_seed(1)
    w = routing_weights(logits, sample=True, temperature=temperature)
    observed = (w[:, 0] > w[:, 1]).double().mean().item()

    g = torch.Generator().manual_seed(2)
    u = torch.rand(2, n, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    noise = u.log() - (1 - u).log()  # standard logistic
    expected = ((l0 + noise[0]) > (l1 + noise[1])).double().mean().item()
    assert abs(observed - expected) < 0.025, (observed, expected)
    # Lower temperatures push the gates towards 0/1: the spread of the weights grows.
    if temperature < 1:
        assert w[:, 0].std() > routing_weights(logits[:2000], sample=True, temperature=3.0)[:, 0].std()


def test_uniform_weights():
    w = uniform_weights(3, 4, dtype=torch.float64)
    assert w.dtype == torch.float64
    assert torch.equal(w, torch.full((3, 4), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("h, K, d_in, d_out, r", SHAPES)
def test_mix_skills_matches_loops(h, K, d_in, d_out, r):
    lora_A, lora_B = inventory(h, K, d_in, d_out, r)
    w = torch.rand(3, h, K, generator=torch.Generator().manual_seed(7))  # any mixture, not only normalised
    A, B = mix_skills(w, lora_A, lora_B)
    assert A.shape == (3, d_in, r) and B.shape == (3, r, d_out)
    for t in range(3):
        A_ref, B_ref = reference.task_lora(lora_A, lora_B, w[t])
        torch.testing.assert_close(A[t].double(), A_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B[t].double(), B_ref, rtol=1e-5, atol=1e-6)


def test_mix_skills_with_stacked_layers():
    # A leading layer dim G: layer g uses its own weights and its own inventory.
    h, K, d_in, d_out, r, G, T = 2, 3, 8, 6, 2, 4, 5
    g = torch.Generator().manual_seed(3)
    lora_A, lora_B = torch.randn(G, K, h, d_in // h, r, generator=g), torch.randn(G, K, h, r, d_out // h, generator=g)
    w = torch.rand(G, T, h, K, generator=g)
    A, B = mix_skills(w, lora_A, lora_B)
    assert A.shape == (G, T, d_in, r) and B.shape == (G, T, r, d_out)
    for layer in range(G):
        for t in range(T):
            A_ref, B_ref = reference.task_lora(lora_A[layer], lora_B[layer], w[layer, t])
            torch.testing.assert_close(A[layer, t].double(), A_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(B[layer, t].double(), B_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h, K, d_in, d_out, r", SHAPES)
def test_join_heads_concatenates_blocks(h, K, d_in, d_out, r):
    lora_A, lora_B = inventory(h, K, d_in, d_out, r)
    A, B = join_heads(lora_A[0], lora_B[0])
    torch.testing.assert_close(A, torch.cat([lora_A[0, j] for j in range(h)], dim=0), rtol=0, atol=0)
    torch.testing.assert_close(B, torch.cat([lora_B[0, j] for j in range(h)], dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("h, K, d_in, d_out, r", SHAPES)
def test_average_skills_is_the_uniform_mixture(h, K, d_in, d_out, r):
    lora_A, lora_B = inventory(h, K, d_in, d_out, r)
    A, B = average_skills(lora_A, lora_B)
    A_ref, B_ref = reference.task_lora(lora_A, lora_B, torch.full((h, K), 1.0 / K, dtype=torch.float64))
    torch.testing.assert_close(A.double(), A_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B.double(), B_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_shape", [(4, 8), (4, 3, 8), (4, 2, 3, 8)])
def test_lora_delta_shared_and_per_row(x_shape):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(*x_shape, generator=g)
    A, B = torch.randn(8, 2, generator=g), torch.randn(2, 5, generator=g)
    shared = lora_delta(x, A, B, 0.5)
    assert shared.shape == (*x_shape[:-1], 5)
    torch.testing.assert_close(shared, 0.5 * torch.einsum("...i,ir,ro->...o", x, A, B))

    A_rows, B_rows = torch.randn(4, 8, 2, generator=g), torch.randn(4, 2, 5, generator=g)
    per_row = lora_delta(x, A_rows, B_rows, 2.0)
    assert per_row.shape == (*x_shape[:-1], 5)
    for i in range(4):
        torch.testing.assert_close(per_row[i], 2.0 * (x[i] @ A_rows[i] @ B_rows[i]))
