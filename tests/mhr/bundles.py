"""Building blocks of the bundle tests (tests/mhr/test_bundle*.py): the bundle they build, and helpers that read,
edit and corrupt a saved bundle directory. File names on disk follow docs/bundle-format.md ("Stored names"),
recomputed here. Corruptions rewrite a file *and* its sha256 in the manifest (under the new content-derived
stored name), so that the check under test fires rather than the checksum.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from transformers import AutoModelForCausalLM

import mhr
import mhr.bundle
from mhr import Bundle, BundleError, LoRA, MHRConfig

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


def injected_model(path: Path, n_tasks: int, seed: int = 0, config: MHRConfig = CONFIG) -> torch.nn.Module:
    """The tiny Llama with MHR layers whose B and routing logits are random (they start at ~0)."""
    model = load_model(path)
    mhr.inject(model, config, n_tasks)
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


def assert_routing_rows(bundle: Bundle, expected: dict[str, dict[str, Tensor]]) -> None:
    """Every routed task of `bundle` has exactly the logits given for it, and no other task is routed:
    per module, as one row of all modules, and in its row of the per-module routing tables."""
    assert sorted(bundle.routed_tasks()) == sorted(expected)
    for task, logits in expected.items():
        assert_same_tensors(bundle.routing_logits(task), logits)
        assert torch.equal(bundle.routing_row(task), torch.stack([logits[m] for m in bundle.modules]))
        row = bundle.routed_tasks().index(task)
        assert all(torch.equal(bundle.routing[m][row], logits[m]) for m in bundle.modules)
