"""mhr.bundle's task API: adding, replacing, renaming and removing tasks keeps every other row and file."""

from __future__ import annotations

import math

import pytest
import torch

import mhr
import mhr.bundle
from mhr import Bundle, BundleError, SkillInventory, TaskKind
from tests.mhr.bundles import (
    CONFIG,
    DENSE_MODULES,
    FILES,
    MODULES,
    Q0,
    Q1,
    TASKS,
    V0,
    assert_routing_rows,
    assert_same_bundle,
    assert_same_lora,
    assert_same_tensors,
    files_in,
    injected_model,
    listed_files,
    manifest_of,
    random_logits,
    random_lora,
    stored_path,
)

# ----- the task API --------------------------------------------------------------------------------

def test_add_routed_task(bundle, built):
    new = random_logits(1)
    bundle.add_routed_task("delta", new, metadata={"steps": 3})
    assert bundle.routed_tasks() == [*TASKS, "delta"]
    assert all(t.shape == (4, 2, 3) for t in bundle.routing.values())
    assert_routing_rows(bundle, {**built.logits, "delta": new})
    assert bundle.task("delta").metadata == {"steps": 3}


def test_add_dense_task(bundle):
    lora = random_lora(DENSE_MODULES, 3, 1.5, seed=4)
    bundle.add_dense_task("delta", lora)
    assert bundle.task("delta").kind is TaskKind.DENSE and bundle.task("delta").alpha == 1.5
    assert_same_lora(bundle.task_lora("delta"), lora)


@pytest.mark.parametrize("kind", ["routed", "dense"])
@pytest.mark.parametrize("existing", ["beta", "dense-1"])
def test_adding_an_existing_name_needs_replace(bundle, built, kind, existing):
    def add(**kwargs):
        if kind == "routed":
            bundle.add_routed_task(existing, random_logits(1), **kwargs)
        else:
            bundle.add_dense_task(existing, random_lora(MODULES, 2, 2.0, seed=6), **kwargs)

    with pytest.raises(BundleError, match=f"task '{existing}' already exists.*replace=True"):
        add()
    assert_same_bundle(bundle, built.bundle)
    add(replace=True)
    assert bundle.task(existing).kind is TaskKind(kind)
    assert bundle.task_names.count(existing) == 1


def test_replace_routed_task(bundle, built, saved):
    new = random_logits(2)
    bundle.add_routed_task("beta", new, replace=True)
    expected = {**built.logits, "beta": new}
    assert_routing_rows(bundle, expected)
    bundle.save(saved)
    assert_routing_rows(Bundle.load(saved), expected)


def test_replace_routed_by_dense_task_keeps_the_other_rows(bundle, built, saved):
    lora = random_lora(MODULES, 2, 2.0, seed=7)
    bundle.add_dense_task("beta", lora, replace=True)
    expected = {t: built.logits[t] for t in ("alpha", "gamma")}
    assert_routing_rows(bundle, expected)
    bundle.save(saved)
    loaded = Bundle.load(saved)
    assert_routing_rows(loaded, expected)
    assert_same_lora(loaded.task_lora("beta"), lora)


def test_replace_dense_by_routed_task_deletes_its_file(bundle, built, saved):
    new = random_logits(3)
    bundle.add_routed_task("dense-1", new, replace=True)
    bundle.save(saved)
    loaded = Bundle.load(saved)
    assert_routing_rows(loaded, {**built.logits, "dense-1": new})
    assert "adapters/dense-1.safetensors" not in manifest_of(saved)["files"]
    assert files_in(saved) == listed_files(saved)


def test_replace_dense_task(bundle, saved):
    lora = random_lora(DENSE_MODULES, 5, 3.0, seed=8)
    bundle.add_dense_task("dense-1", lora, replace=True)
    bundle.save(saved)
    assert_same_lora(Bundle.load(saved).task_lora("dense-1"), lora)


def test_many_changes_keep_every_row_and_never_change_a_row_handed_out(bundle, built, saved):
    """Adds past the table's spare room, removals and replacements, interleaved; the routing rows and
    per-module views taken along the way keep their values; the result saves and loads as it is."""
    expected, handed_out = dict(built.logits), []
    for step in range(40):
        name = f"t{step}"
        expected[name] = random_logits(100 + step)
        bundle.add_routed_task(name, expected[name])
        if step % 7 == 3:
            gone = f"t{step - 2}"
            bundle.remove_task(gone)
            del expected[gone]
        if step % 5 == 4:
            expected["alpha"] = random_logits(500 + step)
            bundle.add_routed_task("alpha", expected["alpha"], replace=True)
        handed_out += [(bundle.routing_row(name), bundle.routing_row(name).clone()),
                       (bundle.routing[Q0], bundle.routing[Q0].clone())]
        assert_routing_rows(bundle, expected)
    assert all(torch.equal(view, values) for view, values in handed_out)
    assert bundle.routed_tasks()[-2:] == ["t39", "alpha"]  # a replaced task moves to the end
    bundle.save(saved)
    assert_routing_rows(Bundle.load(saved), expected)


@pytest.mark.parametrize("removed", TASKS)
def test_remove_routed_task_keeps_the_other_rows_attached(bundle, built, saved, removed):
    bundle.remove_task(removed)
    expected = {t: built.logits[t] for t in TASKS if t != removed}
    assert_routing_rows(bundle, expected)
    bundle.save(saved)
    loaded = Bundle.load(saved)
    assert_routing_rows(loaded, expected)
    inventory = SkillInventory.from_model(built.model)
    for task, logits in expected.items():  # and they still materialize the model's task
        assert_same_lora(loaded.task_lora(task), inventory.materialize_logits(logits))


def test_remove_every_routed_task_deletes_the_routing_file(bundle, saved):
    for task in TASKS:
        bundle.remove_task(task)
    assert bundle.routing == {}
    bundle.save(saved)
    assert "routing.safetensors" not in manifest_of(saved)["files"]
    assert files_in(saved) == listed_files(saved)
    assert Bundle.load(saved).task_names == ["dense-1", "dense-bf16"]


def test_remove_dense_task_deletes_its_file_on_save(bundle, saved):
    old = stored_path(saved, "adapters/dense-1.safetensors")
    bundle.remove_task("dense-1")
    assert old.is_file()  # nothing changes on disk before save
    bundle.save(saved)
    assert not old.exists()
    assert "adapters/dense-1.safetensors" not in manifest_of(saved)["files"]
    assert files_in(saved) == listed_files(saved)
    assert Bundle.load(saved).task_names == [*TASKS, "dense-bf16"]


def test_remove_unknown_task(bundle):
    with pytest.raises(KeyError, match="task 'nope' is not in this bundle.*alpha, beta, gamma, dense-1"):
        bundle.remove_task("nope")


def test_lookups_follow_every_change_of_the_task_list(bundle, built):
    logits = built.logits
    assert_same_tensors(bundle.routing_logits("gamma"), logits["gamma"])  # the lookups are built here
    bundle.remove_task("alpha")                                           # rows shift up
    assert_same_tensors(bundle.routing_logits("gamma"), logits["gamma"])
    bundle.rename_task("gamma", "gimel")
    assert_same_tensors(bundle.routing_logits("gimel"), logits["gamma"])
    bundle.add_routed_task("alpha", logits["alpha"])
    assert_routing_rows(bundle, {"beta": logits["beta"], "gimel": logits["gamma"], "alpha": logits["alpha"]})
    for gone in ("gamma", "nope"):
        with pytest.raises(KeyError, match=f"task '{gone}' is not in this bundle"):
            bundle.task(gone)


def test_unknown_task_error_lists_a_few_names_of_many(bundle, built):
    for i in range(30):
        bundle.add_routed_task(f"extra-{i}", built.logits["alpha"])
    with pytest.raises(KeyError) as error:
        bundle.task("nope")
    shown = str(error.value)  # the 5 tasks of the fixture, then the first 15 extra ones
    assert "extra-14" in shown and "extra-15" not in shown and shown.endswith("... (35 in all))\"")


def test_rename_routed_task_keeps_its_row(bundle, built, saved):
    bundle.rename_task("beta", "bravo")
    assert bundle.task_names[:3] == ["alpha", "bravo", "gamma"]
    expected = {"alpha": built.logits["alpha"], "bravo": built.logits["beta"], "gamma": built.logits["gamma"]}
    assert_routing_rows(bundle, expected)
    bundle.save(saved)
    assert_routing_rows(Bundle.load(saved), expected)


def test_rename_dense_task_keeps_its_lora_and_moves_its_file(bundle, built, saved):
    bundle.rename_task("dense-1", "d1")
    with pytest.raises(KeyError):
        bundle.task("dense-1")
    bundle.save(saved)
    loaded = Bundle.load(saved)
    assert_same_lora(loaded.task_lora("d1"), built.bundle.adapters["dense-1"])
    assert loaded.task("d1").metadata == {"method": "lora"}
    assert set(manifest_of(saved)["files"]) == {*FILES, "adapters/dense-bf16.safetensors"} - {
        "adapters/dense-1.safetensors"} | {"adapters/d1.safetensors"}
    assert files_in(saved) == listed_files(saved)


def test_rename_onto_an_existing_task_is_refused(bundle, built):
    with pytest.raises(BundleError, match="task 'gamma' already exists"):
        bundle.rename_task("alpha", "gamma")
    assert_same_bundle(bundle, built.bundle)


def test_routing_logits_of_a_dense_task(bundle):
    with pytest.raises(BundleError, match="'dense-1' is a dense task"):
        bundle.routing_logits("dense-1")
    with pytest.raises(BundleError, match="'dense-1' is a dense task"):
        bundle.routing_row("dense-1")


@pytest.mark.parametrize("change, words", [
    (lambda d: d.pop(Q1), f"no logits for module '{Q1}'"),
    (lambda d: d.__setitem__(V0, torch.zeros(2, 4)), f"module '{V0}': expected shape [2, 3], found [2, 4]"),
    (lambda d: d.__setitem__(V0, torch.zeros(1, 2, 3)), "expected shape [2, 3], found [1, 2, 3]"),
    (lambda d: d.__setitem__("model.lm_head", torch.zeros(2, 3)), "not in the bundle: ['model.lm_head']"),
    (lambda d: d[Q0].fill_(math.nan), f"module '{Q0}': contains NaN or Inf"),
    (lambda d: d[V0].fill_(math.inf), f"module '{V0}': contains NaN or Inf"),
    (lambda d: d.__setitem__(Q0, torch.zeros(2, 3, dtype=torch.long)), "dtype torch.int64"),
])
def test_invalid_routing_logits_are_refused(bundle, built, change, words):
    logits = random_logits(9)
    change(logits)
    with pytest.raises(BundleError) as e:
        bundle.add_routed_task("delta", logits)
    assert "routing logits of task 'delta'" in str(e.value) and words in str(e.value)
    assert_same_bundle(bundle, built.bundle)


@pytest.mark.parametrize("change, words", [
    (lambda lora: lora.A.update({"model.lm_head": torch.zeros(64, 2)}) or lora.B.update(
        {"model.lm_head": torch.zeros(2, 64)}), "modules not in the bundle: ['model.lm_head']"),
    (lambda lora: lora.A.__setitem__(Q0, torch.zeros(32, 2)), f"'{Q0}.lora_A': expected shape [64, 2], found [32, 2]"),
    (lambda lora: lora.B[V0].fill_(math.inf), f"'{V0}.lora_B': contains NaN or Inf"),
    (lambda lora: setattr(lora, "alpha", 0), "alpha must be > 0"),
])
def test_invalid_dense_lora_is_refused(bundle, built, change, words):
    lora = random_lora(DENSE_MODULES, 2, 2.0, seed=11)
    change(lora)
    with pytest.raises(BundleError) as e:
        bundle.add_dense_task("delta", lora)
    assert "LoRA of task 'delta'" in str(e.value) and words in str(e.value)
    with pytest.raises(BundleError) as e:
        bundle.set_zero_shot(lora)
    assert "zero-shot LoRA" in str(e.value) and words in str(e.value)
    assert_same_bundle(bundle, built.bundle)


def test_from_model_needs_mhr_layers(tiny_llama):
    with pytest.raises(BundleError, match="no MHR layers"):
        Bundle.from_model(tiny_llama, CONFIG, "tiny", tasks=[])


def test_from_model_needs_one_name_per_router_row(built):
    with pytest.raises(BundleError, match=r"2 task name\(s\) for routers with \[3\] rows"):
        Bundle.from_model(built.model, CONFIG, "tiny", tasks=["a", "b"])


def test_from_model_copies_the_models_tensors(tiny_llama_path):
    """Training on after building a bundle must not change the bundle (also with a single task)."""
    model = injected_model(tiny_llama_path, n_tasks=1)
    bundle = Bundle.from_model(model, CONFIG, "tiny", tasks=["only"])
    before = {m: t.clone() for m, t in bundle.routing.items()}
    inventory = {m: t.clone() for m, t in bundle.lora_B.items()}
    with torch.no_grad():
        for layer in mhr.mhr_layers(model).values():
            layer.router.logits.add_(1.0)
            layer.lora_B.add_(1.0)
    assert_same_tensors(bundle.routing, before)
    assert_same_tensors(bundle.lora_B, inventory)


def test_added_adapters_are_copies(bundle):
    lora = random_lora(DENSE_MODULES, 2, 2.0, seed=12)
    logits = random_logits(12)
    kept_lora, kept_logits = lora.to("cpu", copy=True), {m: t.clone() for m, t in logits.items()}
    bundle.add_dense_task("delta", lora)
    bundle.add_routed_task("epsilon", logits)
    bundle.set_zero_shot(lora)
    lora.A[Q0].add_(1.0)
    for t in logits.values():
        t.add_(1.0)
    assert_same_lora(bundle.task_lora("delta"), kept_lora)
    assert_same_lora(bundle.zero_shot_lora(), kept_lora)
    assert_same_tensors(bundle.routing_logits("epsilon"), kept_logits)
