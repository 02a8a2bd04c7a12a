"""mhr.bundle_check: every corruption of a saved bundle is refused, naming the file and what is wrong."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mhr import Bundle, BundleError
from tests.mhr.bundles import (
    DENSE_MODULES,
    FILES,
    MODULES,
    Q0,
    TENSOR_OF_FILE,
    V0,
    V1,
    edit_manifest,
    load_error,
    random_logits,
    random_lora,
    rewrite,
    rewrite_tensors,
    stored_path,
)

# ----- refused corruptions -------------------------------------------------------------------------

def test_missing_manifest(saved):
    (saved / "manifest.json").unlink()
    msg = load_error(saved)
    assert "manifest.json" in msg and "file not found" in msg


def test_missing_directory(tmp_path):
    msg = load_error(tmp_path / "nowhere")
    assert "nowhere" in msg and "not found" in msg


def test_invalid_json_manifest(saved):
    (saved / "manifest.json").write_text('{"format_version": 1, "tasks": [')
    msg = load_error(saved)
    assert "manifest.json" in msg and "not valid JSON" in msg


def test_manifest_not_an_object(saved):
    (saved / "manifest.json").write_text("[1, 2]")
    assert "manifest.json: must hold a JSON object" in load_error(saved)


@pytest.mark.parametrize("rel", FILES)
def test_missing_tensor_file(saved, rel):
    missing = stored_path(saved, rel)
    missing.unlink()
    msg = load_error(saved)
    assert str(missing) in msg and "file not found" in msg


@pytest.mark.parametrize("rel", FILES)
def test_tensor_of_wrong_shape(saved, rel):
    key, expected = TENSOR_OF_FILE[rel]
    found = [*expected[:-1], expected[-1] + 2]
    name = rewrite_tensors(saved, rel, lambda t: t.__setitem__(key, torch.zeros(found)))
    msg = load_error(saved)
    assert name in msg and f"'{key}'" in msg
    assert f"expected shape {expected}, found {found}" in msg


def test_inventory_with_fewer_skills_is_refused(saved):
    rewrite_tensors(saved, "inventory.safetensors", lambda t: t.__setitem__(f"{V1}.lora_B", t[f"{V1}.lora_B"][:2]))
    msg = load_error(saved)
    assert f"'{V1}.lora_B'" in msg and "expected shape [3, 2, 4, 32], found [2, 2, 4, 32]" in msg


@pytest.mark.parametrize("rel", FILES)
def test_tensor_of_integer_dtype(saved, rel):
    key, _ = TENSOR_OF_FILE[rel]
    name = rewrite_tensors(saved, rel, lambda t: t.__setitem__(key, t[key].to(torch.int32)))
    msg = load_error(saved)
    assert name in msg and f"'{key}'" in msg and "torch.int32" in msg


def test_float64_tensor_is_refused(saved):
    key = f"{Q0}.lora_A"
    rewrite_tensors(saved, "inventory.safetensors", lambda t: t.__setitem__(key, t[key].double()))
    assert "dtype torch.float64 is not one of float32, bfloat16, float16" in load_error(saved)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("rel", FILES)
def test_non_finite_values(saved, rel, value):
    key, _ = TENSOR_OF_FILE[rel]

    def poison(tensors: dict[str, Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[-1] = value

    name = rewrite_tensors(saved, rel, poison)
    msg = load_error(saved)
    assert name in msg and f"'{key}'" in msg and "NaN or Inf" in msg


@pytest.mark.parametrize("rel", FILES)
def test_missing_tensor(saved, rel):
    key, _ = TENSOR_OF_FILE[rel]
    name = rewrite_tensors(saved, rel, lambda t: t.pop(key))
    msg = load_error(saved)
    assert name in msg and f"missing tensor(s) ['{key}']" in msg


@pytest.mark.parametrize("rel", FILES)
def test_unexpected_extra_tensor(saved, rel):
    name = rewrite_tensors(saved, rel, lambda t: t.__setitem__("stray", torch.zeros(2)))
    msg = load_error(saved)
    assert name in msg and "unexpected tensor(s) ['stray']" in msg


def test_dense_adapter_for_a_module_outside_the_bundle(saved):
    other = "model.layers.0.mlp.up_proj"
    name = rewrite_tensors(saved, "adapters/dense-1.safetensors", lambda t: t.update(
        {f"{other}.lora_A": torch.zeros(64, 2), f"{other}.lora_B": torch.zeros(2, 128)}))
    msg = load_error(saved)
    assert name in msg and f"modules not in the bundle: ['{other}']" in msg


def test_dense_adapter_with_unequal_ranks(saved):
    name = rewrite_tensors(saved, "adapters/dense-1.safetensors", lambda t: t.update(
        {f"{V0}.lora_A": torch.zeros(64, 3), f"{V0}.lora_B": torch.zeros(3, 64)}))
    msg = load_error(saved)
    assert name in msg and "one rank" in msg


def test_duplicate_task_names_in_manifest(saved):
    edit_manifest(saved, lambda m: m["tasks"][1].__setitem__("name", "alpha"))
    msg = load_error(saved)
    assert "manifest.json" in msg and "tasks[1].name" in msg and "duplicate task name 'alpha'" in msg


BAD_NAMES = ["../x", "a/b", "", ".hidden", "a..b", "x" * 129, "tâche", "a b", "-x", None, 7]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_invalid_task_name_in_manifest(saved, name):
    edit_manifest(saved, lambda m: m["tasks"][0].__setitem__("name", name))
    msg = load_error(saved)
    assert "tasks[0].name" in msg and f"invalid task name {name!r}" in msg


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
@pytest.mark.parametrize("how", ["add_routed_task", "add_dense_task", "rename_task"])
def test_invalid_task_name_via_api(bundle, name, how):
    before = list(bundle.task_names)
    with pytest.raises(BundleError, match="invalid task name"):
        if how == "add_routed_task":
            bundle.add_routed_task(name, random_logits(5))
        elif how == "add_dense_task":
            bundle.add_dense_task(name, random_lora(MODULES, 2, 2.0, seed=5))
        else:
            bundle.rename_task("alpha", name)
    assert bundle.task_names == before


def test_longest_and_punctuated_names_are_accepted(bundle, saved):
    names = ["x" * 128, "A.b_c-9", "0"]
    for i, name in enumerate(names):
        bundle.add_dense_task(name, random_lora(DENSE_MODULES, 2, 2.0, seed=10 + i))
    bundle.save(saved)
    loaded = Bundle.load(saved)
    assert loaded.task_names[-3:] == names
    assert {stored_path(saved, f"adapters/{n}.safetensors").is_file() for n in names} == {True}


@pytest.mark.parametrize("version", [2, 0, "1", 1.5, None], ids=repr)
def test_unknown_format_version(saved, version):
    edit_manifest(saved, lambda m: m.__setitem__("format_version", version))
    msg = load_error(saved)
    assert "manifest.json" in msg and f"'format_version' is {version!r}" in msg and "knows format 1" in msg


@pytest.mark.parametrize("field, value, words", [
    ("revision", "3", "field 'revision' must be an integer"),
    ("revision", -1, "field 'revision' must be >= 0"),
    ("tasks", {}, "field 'tasks' must be a list"),
    ("training", None, "field 'training' must be an object"),
    ("modules", {}, "field 'modules' is empty"),
])
def test_manifest_field_of_wrong_type(saved, field, value, words):
    edit_manifest(saved, lambda m: m.__setitem__(field, value))
    assert words in load_error(saved)


def test_manifest_config_with_unknown_field(saved):
    edit_manifest(saved, lambda m: m["config"].__setitem__("n_expert", 2))
    msg = load_error(saved)
    assert "field 'config'" in msg and "n_expert" in msg


def test_unknown_task_kind(saved):
    edit_manifest(saved, lambda m: m["tasks"][0].__setitem__("kind", "merged"))
    assert "field 'tasks[0].kind' must be one of ('routed', 'dense'), found 'merged'" in load_error(saved)


def test_manifest_files_must_match_the_tasks(saved):
    edit_manifest(saved, lambda m: m["files"].pop("adapters/dense-1.safetensors"))
    msg = load_error(saved)
    assert "field 'files' lists" in msg and "adapters/dense-1.safetensors" in msg


@pytest.mark.parametrize("rel", FILES)
def test_file_changed_after_save(saved, rel):
    changed = stored_path(saved, rel)
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor value: still a valid safetensors file
    changed.write_bytes(bytes(data))
    msg = load_error(saved)
    assert str(changed) in msg and f"sha256 does not match manifest.json 'files.{rel}'" in msg


class PickleTrap:
    """Unpickling this runs os.mkdir(marker): proof that a loader unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def torch_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({f"{Q0}.lora_A": torch.zeros(3, 2, 32, 4), "trap": PickleTrap(marker)}, buffer)
    return buffer.getvalue()


def test_the_pickle_trap_is_live(tmp_path):
    """The pickle below really runs code when unpickled, so its refusal test means something."""
    torch.load(io.BytesIO(torch_pickle(tmp_path / "ran")), weights_only=False)
    assert (tmp_path / "ran").is_dir()


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "torch-pickle"])
@pytest.mark.parametrize("rel", ["inventory.safetensors", "adapters/dense-1.safetensors"])
def test_file_that_is_not_safetensors(saved, tmp_path, rel, kind):
    marker = tmp_path / "unpickled"
    data = {
        "garbage": b"\x89not a tensor file\x00" * 16,
        "empty": b"",
        "truncated": stored_path(saved, rel).read_bytes()[:200],
        "torch-pickle": torch_pickle(marker),
    }[kind]
    name = rewrite(saved, rel, data)
    msg = load_error(saved)
    assert name in msg and "not a valid safetensors file" in msg
    assert not marker.exists()
