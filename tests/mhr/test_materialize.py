"""SkillInventory: materialized task LoRAs against the layers, loop references, and the routed model."""

import pytest
import torch

import mhr
from mhr import MHRConfig, Mode, SkillInventory
from tests.mhr import reference

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # three shapes: 64x64, 64->128, 128->64
N_TASKS, K, H, R = 5, 3, 2, 2


@pytest.fixture
def routed(tiny_llama):
    """The tiny Llama with random (nonzero) skills and routing, in eval mode, and its layers."""
    config = MHRConfig(n_skills=K, n_heads=H, rank=R, alpha=3.0, target_modules=TARGETS)
    layers = mhr.inject(tiny_llama, config, N_TASKS)
    g = torch.Generator().manual_seed(0)
    for layer in layers.values():
        reference.randomize(layer, g)
    return tiny_llama.eval(), layers


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def test_from_model(routed):
    _, layers = routed
    inv = SkillInventory.from_model(routed[0])
    assert inv.modules == list(layers) and len(inv.modules) == 8
    assert (inv.n_skills, inv.n_heads, inv.rank, inv.alpha) == (K, H, R, 3.0)
    A, B = inv.tensors()
    for name, layer in layers.items():
        assert torch.equal(A[name], layer.lora_A) and torch.equal(B[name], layer.lora_B)


def test_materialize_logits_equals_layers_and_loops(routed):
    model, layers = routed
    inv = SkillInventory.from_model(model)
    for task in range(N_TASKS):
        lora = inv.materialize_logits({n: layer.router.logits[task].detach() for n, layer in layers.items()})
        assert lora.alpha == 3.0 and lora.modules == list(layers)
        for name, layer in layers.items():
            with torch.no_grad():
                A_layer, B_layer = layer.task_lora(torch.tensor([task]))
            A_ref, B_ref = reference.routed_task_lora(layer, task)
            assert lora.A[name].shape == (layer.in_features, R)
            assert lora.B[name].shape == (R, layer.out_features)
            close(lora.A[name], A_layer[0], 1e-6)
            close(lora.B[name], B_layer[0], 1e-6)
            close(lora.A[name], A_ref)
            close(lora.B[name], B_ref)


def test_many_tasks_at_once_equal_single_calls(routed):
    model, layers = routed
    inv = SkillInventory.from_model(model)
    tasks = torch.tensor([4, 0, 2, 2])
    many = inv.materialize_logits({n: layer.router.logits[tasks].detach() for n, layer in layers.items()})
    for i, task in enumerate(tasks.tolist()):
        one = inv.materialize_logits({n: layer.router.logits[task].detach() for n, layer in layers.items()})
        picked = many.select(i)
        for name in layers:
            assert many.A[name].shape == (4, layers[name].in_features, R)
            close(picked.A[name], one.A[name], 1e-6)
            close(picked.B[name], one.B[name], 1e-6)
            close(picked.A[name], reference.routed_task_lora(layers[name], task)[0])


def test_one_mixture_for_every_module(routed):
    model, layers = routed
    inv = SkillInventory.from_model(model)
    w = torch.rand(H, K, generator=torch.Generator().manual_seed(5))  # any mixture, applied as given
    lora = inv.materialize(w)
    for name, layer in layers.items():
        A_ref, B_ref = reference.task_lora(layer.lora_A, layer.lora_B, w)
        close(lora.A[name], A_ref)
        close(lora.B[name], B_ref)
    # a stack of mixtures [T, h, K] for every module too
    ws = torch.rand(2, H, K, generator=torch.Generator().manual_seed(6))
    lora = inv.materialize(ws)
    for name, layer in layers.items():
        for t in range(2):
            close(lora.A[name][t], reference.task_lora(layer.lora_A, layer.lora_B, ws[t])[0])


def test_materialize_errors(routed):
    model, layers = routed
    inv = SkillInventory.from_model(model)
    with pytest.raises(ValueError, match="mixing weights"):
        inv.materialize(torch.rand(K, H))
    partial = {n: torch.rand(H, K) for n in list(layers)[:-1]}
    with pytest.raises(KeyError, match=list(layers)[-1].replace(".", r"\.")):
        inv.materialize(partial)


def test_average_is_the_mean_over_skills(routed):
    model, layers = routed
    lora = SkillInventory.from_model(model).average()
    for name, layer in layers.items():
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        A_mu = torch.mean(A, dim=0).reshape(layer.in_features, R)           # [h, d_in/h, r] -> [d_in, r]
        B_mean = torch.mean(B, dim=0)                                          # [h, r, d_out/h]
        B_mu = torch.cat([B_mean[j] for j in range(H)], dim=1)                 # heads along d_out
        close(lora.A[name], A_mu, 1e-6)
        close(lora.B[name], B_mu, 1e-6)


def test_average_equals_average_mode(routed):
    model, _ = routed
    ids = torch.randint(4, 384, (2, 5), generator=torch.Generator().manual_seed(1))
    mhr.set_mode(model, Mode.AVERAGE)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    mhr.load_lora(model, SkillInventory.from_model(model).average())
    with torch.no_grad():
        close(model(input_ids=ids).logits, expected)


def test_bfloat16_inventory(routed):
    model, layers = routed
    A, B = SkillInventory.from_model(model).tensors()
    inv = SkillInventory(A, B, alpha=3.0, dtype=torch.bfloat16)
    assert inv.dtype == torch.bfloat16
    tasks = torch.tensor([1, 3])
    lora = inv.materialize_logits({n: layer.router.logits[tasks].detach() for n, layer in layers.items()})
    avg = inv.average()
    for name, layer in layers.items():
        assert lora.A[name].dtype == lora.B[name].dtype == avg.A[name].dtype == torch.bfloat16
        for i, task in enumerate(tasks.tolist()):
            A_ref, B_ref = reference.routed_task_lora(layer, task)
            close(lora.A[name][i], A_ref, 2e-2)
            close(lora.B[name][i], B_ref, 2e-2)
        close(avg.A[name], layer.lora_A.detach().mean(0).reshape(-1, R), 2e-2)


def test_inventory_rejects_inconsistent_modules():
    with pytest.raises(ValueError, match="same"):
        SkillInventory({"a": torch.zeros(2, 1, 4, 2)}, {"b": torch.zeros(2, 1, 2, 4)}, 1.0)
    with pytest.raises(ValueError, match=r"\(K, h, r\)"):
        SkillInventory({"a": torch.zeros(2, 1, 4, 2), "b": torch.zeros(3, 1, 4, 2)},
                       {"a": torch.zeros(2, 1, 2, 4), "b": torch.zeros(3, 1, 2, 4)}, 1.0)


@pytest.mark.parametrize("task", [0, 3])
def test_materialized_lora_serves_like_routing(routed, task):
    model, layers = routed
    ids = torch.randint(4, 384, (3, 6), generator=torch.Generator().manual_seed(task))
    with mhr.use_tasks(model, task), torch.no_grad():
        routed_logits = model(input_ids=ids).logits
    with mhr.use_tasks(model, (task + 1) % N_TASKS), torch.no_grad():
        other_logits = model(input_ids=ids).logits
    assert (routed_logits - other_logits).abs().max() > 1e-3  # the check below can tell tasks apart

    inv = SkillInventory.from_model(model)
    lora = inv.materialize_logits({n: layer.router.logits[task].detach() for n, layer in layers.items()})
    mhr.load_lora(model, lora)
    with torch.no_grad():
        close(model(input_ids=ids).logits, routed_logits)
    mhr.set_mode(model, Mode.ROUTED)  # the routed inventory is still there
    with mhr.use_tasks(model, task), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, routed_logits)
