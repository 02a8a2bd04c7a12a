"""mhr.bundle and mhr.bundle_check: exact round trip, every refused corruption, the task API, atomic saves.

One bundle is built and saved per module (from the tiny Llama with random B and routing logits); each
test works on its own copy of that directory. Corruptions rewrite a file *and* its sha256 in the
manifest (under the new content-derived stored name), so that the check under test fires rather than
the checksum. File names on disk follow docs/bundle-format.md ("Stored names"), recomputed here.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import mhr
import mhr.bundle
from mhr import Bundle, BundleError, LoRA, MHRConfig, SkillInventory, TaskKind
from tests.mhr.reference import eval_weights, task_lora
from tests.tiny import MODEL_SHAPE

TASKS = ["alpha", "beta", "gamma"]
CONFIG = MHRConfig(n_skills=3, n_heads=2, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
Q0, V0, Q1, V1 = (f"model.layers.{i}.self_attn.{p}_proj" for i, p in ((0, "q"), (0, "v"), (1, "q"), (1, "v")))
MODULES = [Q0, V0, Q1, V1]  # every module is 64 -> 64
DENSE_MODULES = [Q0, V0]    # "dense-1" adapts a subset only
FILES = ["inventory.safetensors", "routing.safetensors", "adapters/dense-1.safetensors", "zero_shot.safetensors"]
TRAINING = {"data": "toy-suite", "steps": 10, "metrics": {"loss": 1.25}}


# ----- building blocks -----------------------------------------------------------------------------

def load_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def injected_model(path: Path, n_tasks: int, seed: int = 0) -> torch.nn.Module:
    """The tiny Llama with MHR layers whose B and routing logits are random (they start at ~0)."""
    model = load_model(path)
    mhr.inject(model, CONFIG, n_tasks)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mhr.mhr_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
            layer.router.logits.copy_(torch.randn(layer.router.logits.shape, generator=g) * 2.0)
    return model.eval()


def random_lora(modules: list[str], rank: int, alpha: float, seed: int, dtype=torch.float32) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    return LoRA({m: torch.randn(64, rank, generator=g).to(dtype) for m in modules},
                {m: torch.randn(rank, 64, generator=g).to(dtype) for m in modules}, alpha)


def random_logits(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(CONFIG.n_heads, CONFIG.n_skills, generator=g) for m in MODULES}


@dataclass
class Built:
    model: torch.nn.Module
    bundle: Bundle                       # as saved (its revision is that of the directory)
    path: Path                           # the saved directory: copy it, never change it
    logits: dict[str, dict[str, Tensor]]  # per task, per module: the model's router row [h, K]


@pytest.fixture(scope="module")
def built(tiny_llama_path, tmp_path_factory) -> Built:
    model = injected_model(tiny_llama_path, n_tasks=len(TASKS))
    layers = mhr.mhr_layers(model)
    logits = {t: {m: layer.router.logits[i].detach().clone() for m, layer in layers.items()}
              for i, t in enumerate(TASKS)}
    bundle = Bundle.from_model(model, CONFIG, backbone=str(tiny_llama_path), tasks=TASKS, training=TRAINING)
    bundle.add_dense_task("dense-1", random_lora(DENSE_MODULES, 2, 4.0, seed=1), metadata={"method": "lora"})
    bundle.add_dense_task("dense-bf16", random_lora(MODULES, 3, 6.0, seed=2, dtype=torch.bfloat16))
    bundle.set_zero_shot(random_lora(MODULES, 4, 8.0, seed=3))
    path = tmp_path_factory.mktemp("built") / "bundle"
    bundle.save(path)
    return Built(model, bundle, path, logits)


@pytest.fixture
def saved(built, tmp_path) -> Path:
    """A private copy of the saved bundle directory."""
    return Path(shutil.copytree(built.path, tmp_path / "bundle"))


@pytest.fixture
def bundle(saved) -> Bundle:
    """The saved bundle, loaded: free to change and save back to `saved`."""
    return Bundle.load(saved)


def assert_same_bundle(a: Bundle, b: Bundle) -> None:
    """Every field and every tensor bitwise equal (dtypes included)."""
    assert (a.config, a.backbone, a.fingerprint, a.modules) == (b.config, b.backbone, b.fingerprint, b.modules)
    assert list(a.modules) == list(b.modules)
    assert a.tasks == b.tasks and a.training == b.training
    assert_same_tensors(a.lora_A, b.lora_A)
    assert_same_tensors(a.lora_B, b.lora_B)
    assert_same_tensors(a.routing, b.routing)
    assert a.adapters.keys() == b.adapters.keys()
    for name in a.adapters:
        assert_same_lora(a.adapters[name], b.adapters[name])
    assert (a.zero_shot is None) == (b.zero_shot is None)
    if a.zero_shot is not None:
        assert_same_lora(a.zero_shot, b.zero_shot)


def assert_same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_same_lora(a: LoRA, b: LoRA) -> None:
    assert a.alpha == b.alpha
    assert_same_tensors(a.A, b.A)  # module order included
    assert_same_tensors(a.B, b.B)


def files_in(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def stored(rel: str, digest: str) -> str:
    """Where docs/bundle-format.md stores the file listed as `rel`: 16 hex digits of its sha256 inserted."""
    return f"{rel.removesuffix('.safetensors')}.{digest[:16]}.safetensors"


def stored_path(path: Path, rel: str) -> Path:
    return path / stored(rel, manifest_of(path)["files"][rel])


def listed_files(path: Path) -> set[str]:
    """The files a bundle directory should hold: the lock, the manifest and every listed tensor file."""
    return {".lock", "manifest.json", *(stored(rel, d) for rel, d in manifest_of(path)["files"].items())}


def load_error(path: Path, **kwargs) -> str:
    with pytest.raises(BundleError) as e:
        Bundle.load(path, **kwargs)
    return str(e.value)


def edit_manifest(path: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def rewrite(path: Path, rel: str, data: bytes) -> str:
    """Replace a bundle file and record its new sha256, so that only the content checks can object.

    Returns the file's new stored name (which the error messages must name)."""
    stored_path(path, rel).unlink()
    digest = hashlib.sha256(data).hexdigest()
    (path / stored(rel, digest)).write_bytes(data)
    edit_manifest(path, lambda m: m["files"].__setitem__(rel, digest))
    return stored(rel, digest)


def rewrite_tensors(path: Path, rel: str, change: Callable[[dict[str, Tensor]], None]) -> str:
    tensors = load_safetensors(stored_path(path, rel).read_bytes())
    change(tensors)
    return rewrite(path, rel, save_safetensors(tensors))


# Per file: one tensor name and its expected shape.
TENSOR_OF_FILE = {
    "inventory.safetensors": (f"{Q0}.lora_A", [3, 2, 32, 4]),
    "routing.safetensors": (V1, [3, 2, 3]),
    "adapters/dense-1.safetensors": (f"{V0}.lora_B", [2, 64]),
    "zero_shot.safetensors": (f"{Q1}.lora_B", [4, 64]),
}


# ----- round trip ----------------------------------------------------------------------------------

def test_round_trip_is_exact(built, tiny_llama_path):
    loaded = Bundle.load(built.path)  # `built` saved it
    assert_same_bundle(loaded, built.bundle)
    assert loaded.task_names == [*TASKS, "dense-1", "dense-bf16"]
    assert [t.kind for t in loaded.tasks] == [TaskKind.ROUTED] * 3 + [TaskKind.DENSE] * 2
    assert loaded.task("dense-1").metadata == {"method": "lora"}
    assert loaded.adapters["dense-bf16"].A[Q0].dtype == torch.bfloat16
    assert (loaded.config, loaded.training, loaded.backbone) == (CONFIG, TRAINING, str(tiny_llama_path))
    assert loaded.modules == {m: (64, 64) for m in MODULES}
    assert loaded.fingerprint == mhr.backbone_fingerprint(built.model)
    # Every listed file is stored under its content-derived name and matches its listed sha256.
    files = manifest_of(built.path)["files"]
    assert set(files) == {*FILES, "adapters/dense-bf16.safetensors"}
    for rel, digest in files.items():
        assert hashlib.sha256((built.path / stored(rel, digest)).read_bytes()).hexdigest() == digest
    assert files_in(built.path) == listed_files(built.path)
    # The inventory and logits are the model's own parameters.
    for m, layer in mhr.mhr_layers(built.model).items():
        assert torch.equal(loaded.lora_A[m], layer.lora_A.detach())
        assert torch.equal(loaded.lora_B[m], layer.lora_B.detach())
        assert torch.equal(loaded.routing[m], layer.router.logits.detach())


def test_routed_task_lora_is_the_models_materialization(built):
    loaded = Bundle.load(built.path)
    layers = mhr.mhr_layers(built.model)
    from_layers = SkillInventory.from_model(built.model)
    for i, task in enumerate(TASKS):
        got = loaded.task_lora(task)
        want = from_layers.materialize_logits({m: layer.router.logits[i].detach() for m, layer in layers.items()})
        assert_same_lora(got, want)
        for m, layer in layers.items():  # and the float64 loop reference of docs/architecture.md, "The math"
            A_ref, B_ref = task_lora(layer.lora_A, layer.lora_B, eval_weights(layer.router.logits[i]))
            torch.testing.assert_close(got.A[m].double(), A_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.B[m].double(), B_ref, rtol=1e-5, atol=1e-6)


def test_dense_task_lora_is_the_stored_adapter(built):
    loaded = Bundle.load(built.path)
    assert_same_lora(loaded.task_lora("dense-1"), built.bundle.adapters["dense-1"])


def test_zero_shot_falls_back_to_the_skill_average(built, bundle, saved):
    bundle.set_zero_shot(None)
    bundle.save(saved)
    loaded = Bundle.load(saved)
    assert loaded.zero_shot is None and "zero_shot.safetensors" not in manifest_of(saved)["files"]
    assert files_in(saved) == listed_files(saved)  # its file is gone
    average = loaded.zero_shot_lora()
    assert average.alpha == CONFIG.alpha
    for m in MODULES:
        A, B = built.bundle.lora_A[m], built.bundle.lora_B[m]  # [K, h, d_in/h, r], [K, h, r, d_out/h]
        A_mu = torch.mean(A, dim=0).reshape(64, 4)                     # heads stacked along d_in
        B_mu = torch.mean(B, dim=0).permute(1, 0, 2).reshape(4, 64)    # heads side by side along d_out
        torch.testing.assert_close(average.A[m], A_mu)
        torch.testing.assert_close(average.B[m], B_mu)


def test_dense_modules_keep_model_order_through_a_round_trip(tiny_llama_path, tmp_path):
    """Model order (q, k, v, o per layer) is not name order (k, o, q, v): a dense LoRA given in any order
    is held, saved and read back in the bundle's module order, so its digest survives a round trip."""
    config = MHRConfig(n_skills=2, n_heads=2, rank=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = load_model(tiny_llama_path)
    mhr.inject(model, config, n_tasks=0)
    bundle = Bundle.from_model(model, config, "tiny", tasks=[])
    order = list(bundle.modules)
    assert order[:4] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    bundle.add_dense_task("d", random_lora(sorted(order, reverse=True), 2, 2.0, seed=20))
    bundle.set_zero_shot(random_lora(sorted(order), 2, 2.0, seed=21))
    assert list(bundle.adapters["d"].A) == list(bundle.zero_shot.A) == order
    bundle.save(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b")
    assert_same_lora(loaded.adapters["d"], bundle.adapters["d"])
    assert_same_lora(loaded.zero_shot, bundle.zero_shot)


def test_stored_zero_shot_adapter_is_served(built):
    assert_same_lora(Bundle.load(built.path).zero_shot_lora(), built.bundle.zero_shot)


def test_backbone_fingerprint_looks_through_mhr_layers_and_ignores_values(built, tiny_llama, tiny_llama_path):
    assert mhr.backbone_fingerprint(built.model) == mhr.backbone_fingerprint(tiny_llama)
    other_seed = LlamaForCausalLM(tiny_llama.config)  # same shapes, other weights
    assert mhr.backbone_fingerprint(other_seed) == mhr.backbone_fingerprint(tiny_llama)
    mhr.inject(other_seed, CONFIG, n_tasks=1)
    mhr.start_average(other_seed)  # dense LoRA parameters are adapter parameters too
    assert mhr.backbone_fingerprint(other_seed) == mhr.backbone_fingerprint(tiny_llama)
    Bundle.load(built.path, model=tiny_llama)
    Bundle.load(built.path, model=other_seed)


@pytest.mark.parametrize("change", [{"hidden_size": 128}, {"num_hidden_layers": 3}, {"intermediate_size": 64}])
def test_backbone_mismatch_is_refused(built, tiny_llama, change):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=tiny_llama.config.vocab_size, **{**MODEL_SHAPE, **change}))
    msg = load_error(built.path, model=other)
    assert "backbone mismatch" in msg and built.bundle.backbone in msg
    assert built.bundle.fingerprint[:16] in msg and mhr.backbone_fingerprint(other)[:16] in msg


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


# ----- the task API --------------------------------------------------------------------------------

def assert_routing_rows(bundle: Bundle, expected: dict[str, dict[str, Tensor]]) -> None:
    """Every routed task of `bundle` has exactly the logits given for it, and no other task is routed:
    per module, as one row of all modules, and in its row of the per-module routing tables."""
    assert sorted(bundle.routed_tasks()) == sorted(expected)
    for task, logits in expected.items():
        assert_same_tensors(bundle.routing_logits(task), logits)
        assert torch.equal(bundle.routing_row(task), torch.stack([logits[m] for m in bundle.modules]))
        row = bundle.routed_tasks().index(task)
        assert all(torch.equal(bundle.routing[m][row], logits[m]) for m in bundle.modules)


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


# ----- atomic saves, concurrent writers, read-only readers ------------------------------------------

def change_every_file(bundle: Bundle) -> None:
    """Change what each of the four tensor files holds, and drop one adapter file."""
    bundle.lora_B = {m: t + 1.0 for m, t in bundle.lora_B.items()}
    bundle.add_routed_task("delta", random_logits(13))
    bundle.add_dense_task("dense-1", random_lora(DENSE_MODULES, 2, 4.0, seed=13), replace=True)
    bundle.set_zero_shot(random_lora(MODULES, 4, 8.0, seed=14))
    bundle.remove_task("dense-bf16")


def test_a_second_writer_from_the_same_revision_is_refused(saved):
    first, second = Bundle.load(saved), Bundle.load(saved)
    first.add_routed_task("delta", random_logits(14))
    first.save(saved)
    second.remove_task("beta")
    with pytest.raises(BundleError) as e:
        second.save(saved)
    assert "manifest.json" in str(e.value)
    assert f"on disk is at revision {first.revision}" in str(e.value)
    assert f"loaded at revision {second.revision}" in str(e.value)
    loaded = Bundle.load(saved)
    assert_same_bundle(loaded, first)
    assert loaded.revision == first.revision == second.revision + 1


def test_a_new_bundle_does_not_overwrite_a_saved_one(built, saved):
    fresh = Bundle.from_model(built.model, CONFIG, "tiny", tasks=TASKS)
    with pytest.raises(BundleError, match="revision"):
        fresh.save(saved)
    assert_same_bundle(Bundle.load(saved), built.bundle)


def test_saves_bump_the_revision(bundle, saved):
    start = bundle.revision
    bundle.save(saved)
    bundle.save(saved)  # the same copy may save again: it holds the revision it wrote
    assert bundle.revision == start + 2 == Bundle.load(saved).revision


def test_successful_save_leaves_no_temporary_or_stale_files(bundle, saved):
    before = files_in(saved)
    assert before == listed_files(saved) and len(before) == 7
    change_every_file(bundle)
    bundle.save(saved)
    after = files_in(saved)
    assert after == listed_files(saved) and len(after) == 6  # dense-bf16 removed
    assert after & before == {".lock", "manifest.json"}  # every tensor file changed


def test_save_deletes_leftovers_of_an_interrupted_save(bundle, saved):
    leftovers = ["inventory.0123456789abcdef.safetensors", "adapters/gone.fedcba9876543210.safetensors"]
    for rel in leftovers:
        (saved / rel).write_bytes(b"half written")
    (saved / "NOTES.txt").write_text("not ours")  # only tensor files are cleaned up
    bundle.save(saved)
    assert files_in(saved) == listed_files(saved) | {"NOTES.txt"}


def test_first_save_keeps_foreign_tensor_files(built, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(save_safetensors({"w": torch.ones(2)}))
    Bundle.load(built.path).save(out)
    assert (out / "model.safetensors").is_file()


def test_unchanged_files_are_not_rewritten(bundle, saved, monkeypatch):
    inventory = stored_path(saved, "inventory.safetensors")
    written = []
    real = mhr.bundle.write_atomic
    monkeypatch.setattr(mhr.bundle, "write_atomic", lambda p, d: written.append(p) or real(p, d))
    bundle.add_routed_task("delta", random_logits(15))
    bundle.save(saved)
    assert written == [stored_path(saved, "routing.safetensors"), saved / "manifest.json"]
    assert stored_path(saved, "inventory.safetensors") == inventory and inventory.is_file()


N_WRITES = 5  # change_every_file: inventory, routing, dense-1, zero-shot, then the manifest


class Failure(OSError):
    pass


def fail_on_call(n: int, real: Callable) -> Callable:
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == n + 1:
            raise Failure(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    failing.calls = calls
    return failing


@pytest.mark.parametrize("target", ["write_atomic", "os.replace"])
@pytest.mark.parametrize("n", range(N_WRITES))
def test_a_save_that_fails_midway_keeps_the_old_bundle(built, bundle, saved, monkeypatch, target, n):
    change_every_file(bundle)
    changed = Bundle.load(saved)
    change_every_file(changed)
    if target == "write_atomic":
        failing = fail_on_call(n, mhr.bundle.write_atomic)
        monkeypatch.setattr(mhr.bundle, "write_atomic", failing)
    else:
        failing = fail_on_call(n, os.replace)
        monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(Failure):
        bundle.save(saved)
    monkeypatch.undo()
    assert len(failing.calls) == n + 1
    assert_same_bundle(Bundle.load(saved), built.bundle)
    assert not any(name.endswith(".tmp") for name in files_in(saved))
    bundle.save(saved)  # the failed save left this copy able to retry
    assert_same_bundle(Bundle.load(saved), changed)
    assert files_in(saved) == listed_files(saved)  # and the retry removed what the failed one wrote


def test_metadata_that_is_not_json_fails_before_any_file_changes(built, bundle, saved):
    bundle.lora_B = {m: t + 1.0 for m, t in bundle.lora_B.items()}
    bundle.training["lr"] = torch.tensor(0.1)
    with pytest.raises(TypeError, match="JSON serializable"):
        bundle.save(saved)
    assert_same_bundle(Bundle.load(saved), built.bundle)
    assert files_in(saved) == listed_files(saved)  # not even an orphan tensor file was written
    del bundle.training["lr"]
    bundle.save(saved)  # and this copy can still save
    assert_same_tensors(Bundle.load(saved).lora_B, bundle.lora_B)


def test_load_from_a_read_only_directory(built, saved):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions: see test_load_when_the_lock_file_cannot_be_created")
    (saved / ".lock").unlink()
    for d in (saved / "adapters", saved):
        d.chmod(0o555)
    try:
        assert_same_bundle(Bundle.load(saved), built.bundle)
        assert not (saved / ".lock").exists()
    finally:
        for d in (saved, saved / "adapters"):
            d.chmod(0o755)


def test_load_when_the_lock_file_cannot_be_created(built, saved, monkeypatch):
    (saved / ".lock").unlink()

    def open_without_lock(file, *args, **kwargs):
        if Path(file).name == ".lock":
            raise PermissionError(30, "Read-only file system", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(mhr.bundle, "open", open_without_lock, raising=False)
    loaded = Bundle.load(saved)
    assert_same_bundle(loaded, built.bundle)
    assert not (saved / ".lock").exists()
    with pytest.raises(PermissionError):  # a writer never goes without the lock
        loaded.save(saved)


def test_a_bundle_built_from_per_module_routing_tables_rows_them_by_task(bundle, built):
    def rebuilt(routing):
        return Bundle(config=bundle.config, backbone=bundle.backbone, fingerprint=bundle.fingerprint,
                      modules=bundle.modules, lora_A=bundle.lora_A, lora_B=bundle.lora_B, tasks=list(bundle.tasks),
                      routing=routing, adapters=bundle.adapters)

    copy = rebuilt({m: t.clone() for m, t in bundle.routing.items()})
    assert_routing_rows(copy, {t: built.logits[t] for t in TASKS})
    missing = next(iter(bundle.modules))
    with pytest.raises(BundleError, match=f"routing logits name modules .*{missing}"):
        rebuilt({m: t for m, t in bundle.routing.items() if m != missing})
