"""MHRLinear against plain dense computations written in the test (tests/mhr/reference.py)."""

import pytest
import torch
from torch import nn

from mhr import MHRConfig, MHRLinear, Mode
from mhr.layer import expand_task_ids
from tests.mhr import reference

D_IN, D_OUT, N_TASKS = 8, 12, 5


def make_layer(h=2, K=3, r=2, alpha=2.0, seed=0, bias=True, **config):
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT, bias=bias)
    layer = MHRLinear(base, MHRConfig(n_skills=K, n_heads=h, rank=r, alpha=alpha, **config), N_TASKS)
    reference.randomize(layer, torch.Generator().manual_seed(seed + 1))
    return layer.eval()


def inputs(shape, seed=10):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(actual, expected):
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h", [1, 2, 4])
@pytest.mark.parametrize("K, r", [(1, 1), (3, 2), (4, 5)])
@pytest.mark.parametrize("x_shape", [(5, D_IN), (5, 3, D_IN)])
def test_routed_layer_equals_dense_reference(h, K, r, x_shape):
    layer = make_layer(h=h, K=K, r=r, seed=h * 10 + K)
    x = inputs(x_shape)
    tasks = [3, 0, 3, 1, 4]  # mixed, with a repeated id
    with torch.no_grad():
        y = layer(x, torch.tensor(tasks))
    assert y.shape == (*x_shape[:-1], D_OUT)
    close(y, reference.routed_forward(layer, x, tasks))


@pytest.mark.parametrize("h", [1, 2, 4])
def test_routed_update_is_a_dense_weight(h):
    # For one task the layer is an ordinary linear layer with weight W + scaling * (A_t B_t)^T.
    layer = make_layer(h=h, K=3, r=3)
    A_t, B_t = reference.routed_task_lora(layer, 2)
    W = layer.base.weight.double() + layer.scaling * (A_t @ B_t).T
    x = inputs((4, 3, D_IN))
    with torch.no_grad():
        close(layer(x, torch.tensor(2)), x.double() @ W.T + layer.base.bias.double())


def test_task_lora_matches_reference():
    layer = make_layer(h=4, K=3, r=2)
    with torch.no_grad():
        A, B = layer.task_lora(torch.tensor([1, 4, 1]))
    for i, t in enumerate([1, 4, 1]):
        A_ref, B_ref = reference.routed_task_lora(layer, t)
        close(A[i], A_ref)
        close(B[i], B_ref)


def test_without_bias():
    layer = make_layer(bias=False)
    x = inputs((3, D_IN))
    with torch.no_grad():
        close(layer(x, torch.tensor([0, 1, 2])), reference.routed_forward(layer, x, [0, 1, 2]))


def test_fresh_layer_adds_nothing():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = MHRLinear(base, MHRConfig(n_skills=3, n_heads=2, rank=2), N_TASKS).eval()
    x = inputs((4, 2, D_IN))
    with torch.no_grad():
        assert torch.equal(layer(x, torch.tensor([0, 1, 2, 3])), base(x))


# -- task id expansion (beam search: transformers repeats each example in place) ------------------


def test_ids_repeat_for_each_beam():
    layer = make_layer()
    x = inputs((6, 2, D_IN))
    with torch.no_grad():
        y = layer(x, torch.tensor([4, 1]))
        close(y, reference.routed_forward(layer, x, [4, 4, 4, 1, 1, 1]))
        assert torch.equal(y, layer(x, torch.tensor([4, 4, 4, 1, 1, 1])))


def test_scalar_id_applies_to_every_row():
    layer = make_layer()
    x = inputs((6, D_IN))
    with torch.no_grad():
        close(layer(x, torch.tensor(3)), reference.routed_forward(layer, x, [3] * 6))


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [0] * 5, [[0, 1], [2, 3], [0, 1]], []])
def test_mismatched_ids_raise(ids):
    layer = make_layer()
    with pytest.raises(ValueError, match="task id"):
        layer(inputs((6, D_IN)), torch.tensor(ids, dtype=torch.long))


def test_expand_task_ids():
    assert expand_task_ids(torch.tensor([2, 0]), 6).tolist() == [2, 2, 2, 0, 0, 0]
    assert expand_task_ids(torch.tensor(1), 3).tolist() == [1, 1, 1]
    assert expand_task_ids(torch.tensor([2, 0, 1]), 3).tolist() == [2, 0, 1]


@pytest.mark.parametrize("bad", [-1, N_TASKS])
def test_out_of_range_task_raises(bad):
    with pytest.raises(IndexError, match="out of range"):
        make_layer()(inputs((2, D_IN)), torch.tensor([0, bad]))


def test_routed_without_ids_raises():
    with pytest.raises(RuntimeError, match="use_tasks"):
        make_layer()(inputs((2, D_IN)))


def test_task_ids_attribute_is_used_and_argument_wins():
    layer = make_layer()
    x = inputs((2, D_IN))
    with torch.no_grad():
        layer.task_ids = torch.tensor([1, 2])
        close(layer(x), reference.routed_forward(layer, x, [1, 2]))
        close(layer(x, torch.tensor([3, 3])), reference.routed_forward(layer, x, [3, 3]))


# -- modes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, K", [(1, 3), (4, 2)])
def test_average_mode_is_uniform_mixture(h, K):
    layer = make_layer(h=h, K=K, r=2)
    layer.mode = Mode.AVERAGE
    A_mu, B_mu = reference.task_lora(layer.lora_A, layer.lora_B, torch.full((h, K), 1.0 / K))
    x = inputs((3, 2, D_IN))
    with torch.no_grad():
        y = layer(x)  # no task ids needed
    close(y, reference.linear_with_lora(x, layer.base.weight, layer.base.bias, A_mu, B_mu, layer.scaling))


def test_dense_mode_is_plain_lora():
    layer = make_layer()
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(D_IN, 3, generator=g), torch.randn(3, D_OUT, generator=g)
    layer.load_dense(A, B, scaling=0.7)
    assert layer.mode is Mode.DENSE
    x = inputs((4, 3, D_IN))
    with torch.no_grad():
        close(layer(x), reference.linear_with_lora(x, layer.base.weight, layer.base.bias, A, B, 0.7))
    A.zero_()  # the layer holds its own copy
    with torch.no_grad():
        assert layer(x).ne(layer.base(x)).any()


@pytest.mark.parametrize("A_shape, B_shape", [((D_IN + 1, 2), (2, D_OUT)), ((D_IN, 2), (2, D_OUT - 1)),
                                              ((D_IN, 2), (3, D_OUT))])
def test_load_dense_rejects_wrong_shapes(A_shape, B_shape):
    with pytest.raises(ValueError, match="do not fit"):
        make_layer().load_dense(torch.zeros(A_shape), torch.zeros(B_shape), 1.0)


def test_dense_mode_without_lora_raises():
    layer = make_layer()
    layer.mode = Mode.DENSE
    with pytest.raises(RuntimeError, match="load_dense"):
        layer(inputs((2, D_IN)))


def test_load_average_then_dense_equals_average_mode():
    layer = make_layer(h=2, K=4, r=3)
    x = inputs((3, 2, D_IN))
    layer.mode = Mode.AVERAGE
    with torch.no_grad():
        averaged = layer(x)
    layer.load_average()
    assert layer.mode is Mode.DENSE and layer.dense_scaling == layer.scaling
    with torch.no_grad():
        torch.testing.assert_close(layer(x), averaged, rtol=1e-6, atol=1e-6)
    # the dense LoRA is a trainable copy: training it leaves the inventory alone
    assert layer.dense_A.requires_grad and layer.dense_A.data_ptr() != layer.lora_A.data_ptr()


def test_base_layer_is_frozen_and_kept():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = MHRLinear(base, MHRConfig(n_skills=2, n_heads=2, rank=2), N_TASKS)
    assert layer.base is base
    assert not base.weight.requires_grad and not base.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "router.logits"}


def test_heads_must_divide_dims():
    with pytest.raises(ValueError, match="divisible"):
        MHRLinear(nn.Linear(D_IN, 10), MHRConfig(n_heads=4), N_TASKS)


# -- training ------------------------------------------------------------------------------------


def test_relaxed_routing_is_stochastic_in_training():
    layer = make_layer(relaxed_routing=True).train()
    x, ids = inputs((4, 2, D_IN)), torch.tensor([0, 1, 1, 2])
    with torch.no_grad():
        a, b = layer(x, ids), layer(x, ids)
    assert not torch.allclose(a, b)
    # one sample per example: two identical rows of one task get different outputs
    same = inputs((1, 2, D_IN)).expand(2, 2, D_IN)
    with torch.no_grad():
        y = layer(same, torch.tensor([3, 3]))
    assert not torch.allclose(y[0], y[1])


def test_training_without_relaxed_routing_equals_eval():
    layer = make_layer(relaxed_routing=False)
    x, ids = inputs((4, 2, D_IN)), torch.tensor([0, 1, 1, 2])
    with torch.no_grad():
        expected = layer.eval()(x, ids)
        assert torch.equal(layer.train()(x, ids), expected)
    close(expected, reference.routed_forward(layer, x, [0, 1, 1, 2]))


@pytest.mark.parametrize("relaxed", [True, False])
def test_gradients_reach_adapter_not_base(relaxed):
    layer = make_layer(relaxed_routing=relaxed).train()
    ids = torch.tensor([0, 2, 2])
    loss = layer(inputs((3, 2, D_IN)), ids).square().sum()
    loss.backward()
    for p in (layer.lora_A, layer.lora_B):
        assert p.grad is not None and p.grad.abs().sum() > 0
    logit_grad = layer.router.logits.grad
    assert logit_grad[[0, 2]].abs().sum() > 0
    assert torch.equal(logit_grad[[1, 3, 4]], torch.zeros_like(logit_grad[[1, 3, 4]]))  # unused tasks
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


def test_dropout_only_in_training():
    layer = make_layer(dropout=0.5, relaxed_routing=False)
    x, ids = inputs((4, 2, D_IN)), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        close(layer.eval()(x, ids), reference.routed_forward(layer, x, [0, 1, 2, 3]))
        assert not torch.allclose(layer.train()(x, ids), layer.eval()(x, ids))


def test_bfloat16_base_keeps_float32_adapter():
    layer = make_layer()
    layer.base.to(torch.bfloat16)
    x = inputs((3, D_IN)).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x, torch.tensor([0, 1, 2]))
    assert layer.lora_A.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference.routed_forward(layer, x, [0, 1, 2]), rtol=2e-2, atol=2e-2)
