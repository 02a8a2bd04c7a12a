"""Few-shot adaptation: what each method trains, what it stores, and that the bundle keeps the rest."""

import json

import pytest
import torch

import mhr
from tests.mhr import reference
from tests.training.conftest import small_config
from training import suite
from training.adapt import adapt, adapted, prepare, store
from training.data import DataError
from training.model import model_for_bundle

NEW = suite.HELD_OUT_TASKS[0]


def shots(n=4, seed=0):
    return suite.generate(NEW, n, seed)


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_mhr_z_trains_only_a_routing_row(bundle_copy):
    before = mhr.Bundle.load(bundle_copy)
    inventory_digest = manifest(bundle_copy)["files"]["inventory.safetensors"]
    adapt(bundle_copy, shots(), NEW, small_config(method="mhr-z"), progress=False)
    after = mhr.Bundle.load(bundle_copy)
    assert manifest(bundle_copy)["files"]["inventory.safetensors"] == inventory_digest  # same bytes on disk
    for m in before.modules:
        assert torch.equal(after.lora_A[m], before.lora_A[m]) and torch.equal(after.lora_B[m], before.lora_B[m])
    assert after.task(NEW).kind is mhr.TaskKind.ROUTED
    logits = after.routing_logits(NEW)
    h, K = before.config.n_heads, before.config.n_skills
    assert logits.keys() == before.modules.keys() and all(t.shape == (h, K) for t in logits.values())
    assert any(t.abs().max() > 1e-2 for t in logits.values())  # trained, away from the +-1e-3 init
    for task in before.task_names:  # the old tasks keep their rows
        for m in before.modules:
            assert torch.equal(after.routing_logits(task)[m], before.routing_logits(task)[m])
    assert after.task(NEW).metadata["method"] == "mhr-z" and after.task(NEW).metadata["examples"] == 4


@pytest.mark.parametrize("method", ["mhr", "poly", "mhr-mu", "lora"])
def test_dense_methods_store_a_lora_of_the_bundle_rank(bundle_copy, method):
    before = mhr.Bundle.load(bundle_copy)
    adapt(bundle_copy, shots(), NEW, small_config(method=method, steps=2), progress=False)
    after = mhr.Bundle.load(bundle_copy)
    task = after.task(NEW)
    assert task.kind is mhr.TaskKind.DENSE and task.metadata["method"] == method
    lora = after.adapters[NEW]
    assert lora.rank == before.config.rank and lora.scaling == pytest.approx(before.config.scaling)
    assert set(lora.modules) == set(before.modules)
    assert all(torch.equal(after.lora_A[m], before.lora_A[m]) for m in before.modules)  # inventory kept
    assert after.routed_tasks() == before.routed_tasks()


def test_mhr_mu_starts_from_the_mean_of_the_skills(pretrained):
    bundle = mhr.Bundle.load(pretrained)
    model, _ = model_for_bundle(bundle, n_tasks=1)
    prepare(model, "mhr-mu", bundle.config)
    h = bundle.config.n_heads
    for name, layer in mhr.mhr_layers(model).items():
        A_mean = bundle.lora_A[name].mean(dim=0)          # [h, d_in/h, r]
        B_mean = bundle.lora_B[name].mean(dim=0)          # [h, r, d_out/h]
        A_ref = torch.cat([A_mean[j] for j in range(h)], dim=0)   # heads stacked along d_in
        B_ref = torch.cat([B_mean[j] for j in range(h)], dim=1)   # heads side by side along d_out
        torch.testing.assert_close(layer.dense_A, A_ref, rtol=0, atol=1e-7)
        torch.testing.assert_close(layer.dense_B, B_ref, rtol=0, atol=1e-7)
        assert layer.dense_A.requires_grad and not layer.lora_A.requires_grad
        assert not layer.router.logits.requires_grad


def test_fresh_lora_starts_as_no_change(pretrained):
    bundle = mhr.Bundle.load(pretrained)
    model, _ = model_for_bundle(bundle, n_tasks=1)
    prepare(model, "lora", bundle.config)
    for layer in mhr.mhr_layers(model).values():
        assert layer.dense_A.abs().sum() > 0 and layer.dense_B.abs().sum() == 0
        assert layer.dense_scaling == bundle.config.scaling


def test_refusals(bundle_copy):
    existing = mhr.Bundle.load(bundle_copy).task_names[0]
    with pytest.raises(mhr.BundleError, match="already in"):
        adapt(bundle_copy, suite.generate(existing, 2, 0), existing, small_config(method="mhr-z"), progress=False)
    with pytest.raises(DataError, match="also holds"):
        adapt(bundle_copy, shots() + suite.generate(existing, 1, 0), NEW, small_config(method="mhr-z"),
              progress=False)
    revision = manifest(bundle_copy)["revision"]
    adapt(bundle_copy, suite.generate(existing, 2, 0), existing, small_config(method="mhr-z", steps=1),
          replace=True, progress=False)
    assert manifest(bundle_copy)["revision"] == revision + 1


def test_mhr_stores_the_materialized_task_lora(pretrained):
    # the dense task must be what routing the new row over the (changed) inventory gives at evaluation
    bundle = mhr.Bundle.load(pretrained)
    model, _ = model_for_bundle(bundle, n_tasks=1)
    prepare(model, "mhr", bundle.config)
    generator = torch.Generator().manual_seed(0)
    for layer in mhr.mhr_layers(model).values():
        reference.randomize(layer, generator)
    store(bundle, NEW, adapted(model, "mhr"), {}, replace=False)
    stored = bundle.adapters[NEW]
    for name, layer in mhr.mhr_layers(model).items():
        A_ref, B_ref = reference.routed_task_lora(layer, 0)
        torch.testing.assert_close(stored.A[name].double(), A_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stored.B[name].double(), B_ref, rtol=1e-5, atol=1e-6)
    assert stored.scaling == pytest.approx(bundle.config.scaling)
