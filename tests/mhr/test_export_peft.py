"""mhr.export_peft: a task's LoRA as the PEFT LoRA directory, and PEFT LoRA directories read back.

The reference is PEFT itself: an exported adapter loaded by `PeftModel.from_pretrained` must give the
logits of the MHR model serving that task, and an adapter trained (here: randomized) and saved by PEFT
must give PEFT's logits once imported and loaded into the MHR layers.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import mhr
from mhr import Bundle, LoRA, MHRConfig, Mode, PeftFormatError, export_peft, import_peft
from mhr.export_peft import import_peft_files
from tests.mhr.bundles import injected_model, load_model

TARGETS = ["q_proj", "v_proj"]
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in TARGETS]
TASKS = ["t0", "t1"]
ATOL = 1e-5


def input_ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, vocab_size, (2, 11), generator=g)


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def assert_adapter_matters(adapted: torch.Tensor, bare: torch.Tensor) -> None:
    """Guard against vacuous equality: the adapter must move the logits well beyond the tolerance."""
    assert (adapted - bare).abs().max() > 1000 * ATOL


def mhr_model(path: Path, n_heads: int, n_tasks: int, seed: int = 0) -> tuple[torch.nn.Module, MHRConfig]:
    """The tiny Llama with MHR layers whose B and routing logits are random (they start at ~0)."""
    config = MHRConfig(n_skills=3, n_heads=n_heads, rank=4, alpha=8.0, target_modules=TARGETS)
    return injected_model(path, n_tasks, seed, config), config


def random_lora(rank: int, alpha: float, seed: int, modules: list[str] = MODULES) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    return LoRA({m: torch.randn(64, rank, generator=g) * 0.2 for m in modules},
                {m: torch.randn(rank, 64, generator=g) * 0.2 for m in modules}, alpha)


def peft_logits(base_path: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(load_model(base_path), adapter_dir).eval()
    return logits_of(model, ids)


# ----- export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["routed", "dense", "zero-shot"])
@pytest.mark.parametrize("n_heads", [1, 2])
def test_exported_adapter_gives_the_mhr_models_logits_in_peft(tiny_llama_path, tmp_path, n_heads, which):
    model, config = mhr_model(tiny_llama_path, n_heads, n_tasks=len(TASKS))
    bundle = Bundle.from_model(model, config, str(tiny_llama_path), TASKS)
    ids = input_ids(model.config.vocab_size)
    bare = logits_of(load_model(tiny_llama_path), ids)
    if which == "routed":
        lora = bundle.task_lora("t1")
        with mhr.use_tasks(model, 1):
            expected = logits_of(model, ids)
    elif which == "dense":
        lora = random_lora(rank=3, alpha=5.0, seed=1)
        bundle.add_dense_task("d", lora)
        lora = bundle.task_lora("d")
        mhr.load_lora(model, lora)
        expected = logits_of(model, ids)
    else:  # no trained zero-shot adapter stored: the average of the skills, Mode.AVERAGE in the layers
        lora = bundle.zero_shot_lora()
        mhr.set_mode(model, Mode.AVERAGE)
        expected = logits_of(model, ids)
    out = export_peft(lora, tmp_path / "peft", base_model_name_or_path=str(tiny_llama_path))
    assert out == tmp_path / "peft"
    got = peft_logits(tiny_llama_path, out, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert_adapter_matters(got, bare)


def test_adapter_config_and_tensor_names_follow_peft(tiny_llama_path, tmp_path):
    lora = random_lora(rank=3, alpha=6.0, seed=2)
    export_peft(lora, tmp_path / "ours", base_model_name_or_path="org/tiny-llama")
    config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (3, 6.0)
    assert sorted(config["target_modules"]) == TARGETS
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.LoraConfig.from_pretrained(tmp_path / "ours")  # PEFT knows every key we wrote
    assert (loaded.r, loaded.lora_alpha, set(loaded.target_modules)) == (3, 6.0, set(TARGETS))

    # The reference: what PEFT itself writes for the same targets and rank.
    reference = peft.get_peft_model(load_model(tiny_llama_path),
                                    peft.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS))
    reference.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours/adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for m in MODULES:  # nn.Linear layout: A [r, d_in], B [d_out, r]
        assert torch.equal(ours[f"base_model.model.{m}.lora_A.weight"], lora.A[m].T)
        assert torch.equal(ours[f"base_model.model.{m}.lora_B.weight"], lora.B[m].T)


def test_export_then_import_is_the_same_update(tmp_path):
    lora = random_lora(rank=3, alpha=6.0, seed=3)
    back = import_peft(export_peft(lora, tmp_path / "a", "tiny"))
    assert sorted(back.modules) == sorted(lora.modules)
    for m in MODULES:
        torch.testing.assert_close(back.delta_weight(m), lora.delta_weight(m), rtol=1e-6, atol=1e-7)


def test_export_refuses_an_existing_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists.*overwrite=True"):
        export_peft(random_lora(2, 2.0, seed=4), out, "tiny")
    assert os.listdir(out) == ["keep.txt"]


def test_export_with_overwrite_replaces_the_directory_completely(tmp_path):
    out = tmp_path / "out"
    export_peft(random_lora(2, 2.0, seed=5, modules=MODULES[:1]), out, "old-base")
    (out / "stale.bin").write_bytes(b"old")
    new = random_lora(3, 6.0, seed=6)
    export_peft(new, out, "new-base", overwrite=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "new-base"
    back = import_peft(out)
    for m in MODULES:
        torch.testing.assert_close(back.delta_weight(m), new.delta_weight(m), rtol=1e-6, atol=1e-7)
    assert os.listdir(tmp_path) == ["out"]  # no temporary or old directory left beside it


def test_exported_directory_follows_the_umask(tmp_path):
    """A server running as another user must be able to open the directory (mkdtemp would make it 0700)."""
    old = os.umask(0o022)
    try:
        out = export_peft(random_lora(2, 2.0, seed=7), tmp_path / "out", "tiny")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    # The files in it are 0600 for now: see the xfail in tests/mhr/test_files.py (mhr.files.write_atomic).


# ----- import ---------------------------------------------------------------------------------------

PEFT_CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    # per-module ranks and alphas; PEFT reads pattern keys as regular expressions over module names
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
                     alpha_pattern={"v_proj": 3, r"layers\.1\.self_attn\.q_proj": 32}),
    "rslora-patterns": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 8},
                            alpha_pattern={r"model\.layers\.0\..*": 2}),
}


def peft_adapter(base_path: Path, out: Path, seed: int = 0, **config) -> peft.PeftModel:
    """A PEFT LoRA over q_proj and v_proj with random A and B, saved to `out`."""
    model = peft.get_peft_model(load_model(base_path), peft.LoraConfig(target_modules=TARGETS, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return model.eval()


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_imported_peft_adapter_gives_peft_logits(tiny_llama_path, tmp_path, name):
    reference = peft_adapter(tiny_llama_path, tmp_path / "peft", **PEFT_CONFIGS[name])
    ids = input_ids(reference.config.vocab_size)
    expected = logits_of(reference, ids)
    with reference.disable_adapter():
        assert_adapter_matters(expected, logits_of(reference, ids))

    lora = import_peft(tmp_path / "peft")
    assert sorted(lora.modules) == sorted(MODULES)
    model, config = mhr_model(tiny_llama_path, n_heads=2, n_tasks=0)
    mhr.load_lora(model, lora)
    torch.testing.assert_close(logits_of(model, ids), expected, rtol=0, atol=ATOL)

    # As a dense task of a bundle, through save and load.
    bundle = Bundle.from_model(model, config, str(tiny_llama_path), tasks=[])
    bundle.add_dense_task("from-peft", lora)
    bundle.save(tmp_path / "bundle")
    served = Bundle.load(tmp_path / "bundle", model=model).task_lora("from-peft")
    fresh, _ = mhr_model(tiny_llama_path, n_heads=2, n_tasks=0)
    mhr.load_lora(fresh, served)
    torch.testing.assert_close(logits_of(fresh, ids), expected, rtol=0, atol=ATOL)


def test_per_module_scaling_is_folded_exactly(tiny_llama_path, tmp_path):
    """Each module's PEFT scaling ends up in its B; ranks are zero-padded to the largest."""
    reference = peft_adapter(tiny_llama_path, tmp_path / "peft", **PEFT_CONFIGS["patterns"])
    lora = import_peft(tmp_path / "peft")
    assert lora.rank == 6 and lora.scaling == 1.0
    layers = {name.removeprefix("base_model.model."): module for name, module in reference.named_modules()
              if isinstance(module, LoraLayer)}
    for m in MODULES:
        layer = layers[m]
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r_m, d_in], [d_out, r_m]
        want = (B @ A) * layer.scaling["default"]                                # [d_out, d_in]
        torch.testing.assert_close(lora.delta_weight(m), want.detach(), rtol=1e-6, atol=1e-7)
        r_m = A.shape[0]
        assert not lora.A[m][:, r_m:].any() and not lora.B[m][r_m:].any()


@pytest.fixture(scope="module")
def peft_dir(tiny_llama_path, tmp_path_factory) -> Path:
    """A valid PEFT LoRA directory; tests edit copies of it."""
    out = tmp_path_factory.mktemp("peft") / "adapter"
    peft_adapter(tiny_llama_path, out, **PEFT_CONFIGS["plain"])
    return out


@pytest.fixture
def adapter(peft_dir, tmp_path) -> Path:
    return Path(shutil.copytree(peft_dir, tmp_path / "adapter"))


def edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def import_error(adapter: Path) -> str:
    with pytest.raises(PeftFormatError) as e:
        import_peft(adapter)
    return str(e.value)


def test_the_unedited_adapter_imports(adapter):
    assert sorted(import_peft(adapter).modules) == sorted(MODULES)


@pytest.mark.parametrize("field, value, words", [
    ("use_dora", True, "DoRA adapters are not supported"),
    ("modules_to_save", ["lm_head"], "adapters that retrain whole modules are not supported"),
    ("bias", "all", "LoRA biases are not supported"),
    ("bias", "lora_only", "LoRA biases are not supported"),
    ("fan_in_fan_out", True, "Conv1D (fan_in_fan_out) layouts are not supported"),
    ("peft_type", "LOHA", "only LORA adapters can be imported"),
    ("peft_type", None, "only LORA adapters can be imported"),
    ("r", 0, "must be a number > 0"),
    ("lora_alpha", "8", "must be a number > 0"),
])
def test_unsupported_config_is_refused(adapter, field, value, words):
    edit_config(adapter, **{field: value})
    msg = import_error(adapter)
    assert str(adapter / "adapter_config.json") in msg and f"field '{field}'" in msg and words in msg


def test_missing_config(adapter):
    (adapter / "adapter_config.json").unlink()
    msg = import_error(adapter)
    assert str(adapter / "adapter_config.json") in msg and "file not found" in msg


def test_invalid_json_config(adapter):
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA",')
    msg = import_error(adapter)
    assert "adapter_config.json" in msg and "not valid JSON" in msg


def test_missing_weights(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    msg = import_error(adapter)
    assert str(adapter / "adapter_model.safetensors") in msg and "file not found" in msg


class PickleTrap:
    """Unpickling this runs os.mkdir(marker): proof that a loader unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickle_weights_are_refused_and_never_loaded(adapter, tmp_path):
    marker = tmp_path / "unpickled"
    data = pickle.dumps({"trap": PickleTrap(marker)})
    pickle.loads(pickle.dumps(PickleTrap(tmp_path / "live")))  # the trap is live...
    assert (tmp_path / "live").is_dir()
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(data)
    msg = import_error(adapter)
    assert str(adapter / "adapter_model.bin") in msg and "pickle weights are never loaded" in msg
    assert not marker.exists()  # ...and was not sprung


def test_weights_that_are_not_safetensors(adapter):
    (adapter / "adapter_model.safetensors").write_bytes(b"\x80\x04not safetensors")
    msg = import_error(adapter)
    assert "adapter_model.safetensors" in msg and "not a valid safetensors file" in msg


@pytest.mark.parametrize("change, words", [
    (lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", torch.zeros(64)),
     "unexpected tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias'"),
    (lambda t: t.__setitem__("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(4, 384)),
     "unexpected tensor 'base_model.model.model.embed_tokens.lora_embedding_A'"),
    (lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
     "do not pair up: ['model.layers.1.self_attn.v_proj']"),
    (lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", torch.zeros(64, 3)),
     "module 'model.layers.0.self_attn.q_proj': lora_A [4, 64] and lora_B [64, 3]"),
    (lambda t: t.clear(), "no LoRA tensors"),
])
def test_unsupported_weights_are_refused(adapter, change, words):
    tensors = load_file(adapter / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, adapter / "adapter_model.safetensors")
    msg = import_error(adapter)
    assert str(adapter / "adapter_model.safetensors") in msg and words in msg


# ----- alphas and scales --------------------------------------------------------------------------

@pytest.mark.parametrize("changes, field, words", [
    (dict(lora_alpha=float("inf")), "lora_alpha", "must be a number > 0 and finite"),   # written as Infinity
    (dict(lora_alpha=float("nan")), "lora_alpha", "must be a number > 0 and finite"),
    (dict(lora_alpha=10 ** 400), "lora_alpha", "must be a number > 0 and finite"),      # no float holds it
    (dict(lora_alpha=1e308), "lora_alpha", "the scaling alpha / r = 2.5e+307 (r = 4) is above 10000"),
    (dict(lora_alpha=4e4 + 4), "lora_alpha", "the scaling alpha / r = 1e+04 (r = 4) is above 10000"),
    (dict(lora_alpha=2e4 + 2, use_rslora=True), "lora_alpha", "the scaling alpha / sqrt(r) = 1e+04 (r = 4)"),
    (dict(alpha_pattern={"v_proj": float("inf")}), "alpha_pattern.v_proj", "alpha must be > 0 and finite"),
    (dict(alpha_pattern={"v_proj": -1}), "alpha_pattern.v_proj", "alpha must be > 0 and finite"),
    (dict(alpha_pattern={"v_proj": 1e9}), "alpha_pattern.v_proj", "is above 10000"),
    (dict(alpha_pattern={"v_proj": "8"}), "alpha_pattern.v_proj", "alpha must be > 0 and finite"),
    (dict(alpha_pattern=[8]), "alpha_pattern", "must be an object"),
    (dict(alpha_pattern={"(v_proj": 2}), "alpha_pattern", "is not a regular expression"),
])
def test_alphas_that_are_not_finite_or_scale_too_far_are_refused(adapter, changes, field, words):
    edit_config(adapter, **changes)
    msg = import_error(adapter)
    assert str(adapter / "adapter_config.json") in msg and f"field '{field}'" in msg and words in msg, msg


def test_the_largest_scale_allowed_imports(adapter):
    edit_config(adapter, lora_alpha=4e4)  # r = 4: scaling exactly MAX_SCALING
    assert import_peft(adapter).modules


def test_files_import_from_bytes_like_the_directory(adapter):
    files = [(adapter / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")]
    assert import_peft_files(*files).equal(import_peft(adapter))
    edit_config(adapter, lora_alpha=float("inf"))
    with pytest.raises(PeftFormatError) as e:
        import_peft_files((adapter / "adapter_config.json").read_bytes(), files[1])
    assert str(e.value).startswith("adapter_config.json: field 'lora_alpha'") and str(adapter) not in str(e.value)


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 0.0, 1e308])
def test_export_refuses_an_alpha_out_of_bounds_and_writes_nothing(tmp_path, alpha):
    lora = random_lora(rank=3, alpha=1.0, seed=4)
    lora.alpha = alpha
    with pytest.raises(ValueError, match="cannot export a LoRA whose alpha must be"):
        export_peft(lora, tmp_path / "out", "base")
    assert not list(tmp_path.iterdir())


def test_exported_config_is_standard_json(tmp_path):
    out = export_peft(random_lora(rank=3, alpha=6.0, seed=5), tmp_path / "out", "base")
    config = json.loads((out / "adapter_config.json").read_text(), parse_constant=pytest.fail)
    assert config["lora_alpha"] == 6.0
