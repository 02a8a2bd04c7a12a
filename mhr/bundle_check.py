"""Validation of bundles: the manifest's fields and every tensor file, with errors naming file and field.

Nothing here is trusted: a bundle may come from an upload, another version or a disk that lost a write.
Tensors are read from safetensors only (never unpickled), checked against the manifest's sha256, and
their names, shapes, dtypes and values (no NaN/Inf) against the config. Every alpha must be finite, > 0
and keep its scale alpha / r within `mhr.adapter.MAX_SCALING`; no number in the manifest may be NaN or
infinite (JSON has neither, and `Bundle.save` writes standard JSON only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mhr.adapter import LoRA, scale_problem
from mhr.config import ConfigError, MHRConfig
from mhr.files import FileFormatError, parse_safetensors, read_json_object, sha256

FORMAT_VERSION = 1
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TASK_KINDS = ("routed", "dense")
_SHA256 = re.compile(r"[0-9a-f]{64}")


STORED_NAME = re.compile(r".+\.[0-9a-f]{16}\.safetensors")  # what save may delete: only its own files


def stored_name(rel: str, digest: str) -> str:
    """Where the file listed as `rel` with sha256 `digest` lives: "adapters/t.safetensors" ->
    "adapters/t.<first 16 hex digits>.safetensors". Content-named files are never overwritten in place."""
    stem = rel.removesuffix(".safetensors")
    return f"{stem}.{digest[:16]}.safetensors"


class BundleError(ValueError):
    """A bundle (or a change to one) that is invalid; the message names the file and the field or tensor."""


def check_task_name(name: Any, where: str) -> None:
    """Task names end up in URLs and file names: 1-128 of [A-Za-z0-9._-], starting alphanumeric, no '..'."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name) or ".." in name:
        raise BundleError(f"{where}: invalid task name {name!r}: use 1-128 characters of A-Z a-z 0-9 . _ -, "
                          "starting with a letter or digit, without '..'")


def check_tensor(t: Tensor, shape: tuple[int, ...], where: str) -> None:
    """Shape, float dtype and finite values of one tensor; `where` names it in the error."""
    check_layout(t, shape, where)
    if not torch.isfinite(t).all():
        raise BundleError(f"{where}: contains NaN or Inf values")


def check_layout(t: Tensor, shape: tuple[int, ...], where: str) -> None:
    """Shape and float dtype of one tensor (not its values); `where` names it in the error."""
    if tuple(t.shape) != tuple(shape):
        raise BundleError(f"{where}: expected shape {list(shape)}, found {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise BundleError(f"{where}: dtype {t.dtype} is not one of float32, bfloat16, float16")


def checked_routing_row(logits: Mapping[str, Tensor], modules: list[str], config: MHRConfig, where: str) -> Tensor:
    """One task's logits [h, K] for each of `modules` (checked: present, shape, float dtype, finite) as a new
    CPU tensor [M, h, K] in `modules` order. Values are checked once for the whole row (one op, not one per
    module); an error still names the module."""
    for module in modules:
        if logits.get(module) is None:
            raise BundleError(f"{where}: no logits for module {module!r}")
        check_layout(logits[module], (config.n_heads, config.n_skills), f"{where}, module {module!r}")
    row = torch.stack([logits[m].detach() for m in modules]).cpu()
    if not torch.isfinite(row).all():
        bad = next(m for m, values in zip(modules, row, strict=True) if not torch.isfinite(values).all())
        raise BundleError(f"{where}, module {bad!r}: contains NaN or Inf values")
    return row


def check_dense_lora(lora: LoRA, modules: Mapping[str, tuple[int, int]], where: str) -> None:
    """A dense LoRA fits the bundle: its modules are bundle modules, with [d_in, r] / [r, d_out] shapes."""
    extra = sorted(set(lora.modules) - set(modules))
    if extra:
        raise BundleError(f"{where}: modules not in the bundle: {extra} (bundle modules: {list(modules)[:4]}…)")
    problem = scale_problem(lora.alpha, lora.rank)
    if problem:
        raise BundleError(f"{where}: alpha {problem}")
    r = lora.rank
    for m in lora.modules:
        d_in, d_out = modules[m]
        check_tensor(lora.A[m], (d_in, r), f"{where}: tensor '{m}.lora_A'")
        check_tensor(lora.B[m], (r, d_out), f"{where}: tensor '{m}.lora_B'")


# ----- manifest ---------------------------------------------------------------------------------------

def check_manifest(path: Path) -> dict[str, Any]:
    """Parse and validate manifest.json; returns it as a dict whose fields have the documented types."""
    watch = _NumberWatch()
    try:
        m = read_json_object(path, "a bundle directory", parse_float=watch.number, parse_constant=watch.constant)
    except FileFormatError as e:
        raise BundleError(str(e)) from None
    version = m.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: field 'format_version' is {version!r}; this reader knows format "
                          f"{FORMAT_VERSION} only: upgrade mhr-serve or re-export the bundle")

    def need(obj: dict, key: str, kind: type | tuple, label: str) -> Any:
        value = obj.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise BundleError(f"{path}: field '{label}' must be {_kind_name(kind)}, found {value!r}")
        return value

    if need(m, "revision", int, "revision") < 0:
        raise BundleError(f"{path}: field 'revision' must be >= 0")
    backbone = need(m, "backbone", dict, "backbone")
    need(backbone, "name_or_path", str, "backbone.name_or_path")
    need(backbone, "fingerprint", str, "backbone.fingerprint")
    config = _config(need(m, "config", dict, "config"), path)
    modules = need(m, "modules", dict, "modules")
    if not modules:
        raise BundleError(f"{path}: field 'modules' is empty")
    for name, dims in modules.items():
        if not (isinstance(dims, list) and len(dims) == 2 and all(type(d) is int and d > 0 for d in dims)):
            raise BundleError(f"{path}: field 'modules.{name}' must be [d_in, d_out], found {dims!r}")
        if dims[0] % config.n_heads or dims[1] % config.n_heads:
            raise BundleError(f"{path}: field 'modules.{name}': {dims} not divisible by n_heads={config.n_heads}")
    seen = set()
    for i, task in enumerate(need(m, "tasks", list, "tasks")):
        label = f"tasks[{i}]"
        if not isinstance(task, dict):
            raise BundleError(f"{path}: field '{label}' must be an object, found {task!r}")
        check_task_name(task.get("name"), f"{path}: field '{label}.name'")
        if task["name"] in seen:
            raise BundleError(f"{path}: field '{label}.name': duplicate task name {task['name']!r}")
        seen.add(task["name"])
        if task.get("kind") not in TASK_KINDS:
            raise BundleError(f"{path}: field '{label}.kind' must be one of {TASK_KINDS}, found {task.get('kind')!r}")
        if task["kind"] == "dense":
            check_scale(need(task, "alpha", (int, float), f"{label}.alpha"), None, path, f"{label}.alpha")
        need(task, "metadata", dict, f"{label}.metadata")
    zero_shot = m.get("zero_shot")
    if zero_shot is not None:
        need(m, "zero_shot", dict, "zero_shot")
        check_scale(need(zero_shot, "alpha", (int, float), "zero_shot.alpha"), None, path, "zero_shot.alpha")
    need(m, "training", dict, "training")
    files = need(m, "files", dict, "files")
    for rel, digest in files.items():
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise BundleError(f"{path}: field 'files.{rel}' must be a sha256 hex digest, found {digest!r}")
    expected = _expected_files(m)
    if set(files) != expected:
        raise BundleError(f"{path}: field 'files' lists {sorted(files)}, the tasks need {sorted(expected)}")
    if watch.seen:  # only then the slower walk, to name the field
        check_standard_json(m, path)
    return m


def _config(fields: dict[str, Any], path: Path) -> MHRConfig:
    """The MHRConfig of the manifest's 'config' `fields`, its alpha checked like every other alpha."""
    if "alpha" in fields:  # checked first: MHRConfig's own error would name the field 'config' only
        check_scale(fields["alpha"], None, path, "config.alpha")
    try:
        config = MHRConfig.from_dict(fields)
    except (ConfigError, TypeError) as e:
        raise BundleError(f"{path}: field 'config': {e}") from None
    check_scale(config.alpha, config.rank, path, "config.alpha")
    return config


class _NumberWatch:
    """json.loads hooks that note a number no finite float holds: NaN, Infinity, -Infinity (not JSON, which
    Python reads anyway) and literals past float's range such as 1e999."""

    def __init__(self) -> None:
        self.seen = False

    def constant(self, name: str) -> float:
        self.seen = True
        return float(name)

    def number(self, text: str) -> float:
        value = float(text)
        self.seen = self.seen or not math.isfinite(value)
        return value


def check_standard_json(manifest: dict[str, Any], path: Path) -> None:
    """Refuse a NaN or infinite number anywhere in `manifest` (metadata included): JSON has neither, so a
    manifest holding one could not be saved again, and an alpha of Infinity would serve padding."""
    for label, value in _numbers(manifest, ""):
        if not math.isfinite(value):
            raise BundleError(f"{path}: field '{label}' is {value!r}: a manifest holds finite numbers only")


def _numbers(value: Any, label: str) -> Iterator[tuple[str, float]]:
    """Every float in a JSON value with its dotted field label, walked without recursion (any depth)."""
    stack = [(label, value)]
    while stack:
        label, value = stack.pop()
        if isinstance(value, float):
            yield label, value
        elif isinstance(value, dict):
            stack.extend((f"{label}.{k}" if label else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{label}[{i}]", v) for i, v in enumerate(value))


def _expected_files(m: dict[str, Any]) -> set[str]:
    files = {"inventory.safetensors"}
    if any(t["kind"] == "routed" for t in m["tasks"]):
        files.add("routing.safetensors")
    files |= {f"adapters/{t['name']}.safetensors" for t in m["tasks"] if t["kind"] == "dense"}
    if m.get("zero_shot") is not None:
        files.add("zero_shot.safetensors")
    return files


def check_scale(value: float, rank: int | None, path: Path, label: str) -> None:
    """Refuse the alpha in field `label` of manifest `path` unless finite, > 0 and within the scale bound
    for `rank` (None: rank not known yet, the bound is checked once the tensors are read)."""
    problem = scale_problem(value, rank)
    if problem:
        raise BundleError(f"{path}: field '{label}' {problem}")


def _kind_name(kind: type | tuple) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# ----- tensor files -----------------------------------------------------------------------------------

@dataclass
class BundleTensors:
    lora_A: dict[str, Tensor]
    lora_B: dict[str, Tensor]
    routing: dict[str, Tensor]
    adapters: dict[str, LoRA]
    zero_shot: LoRA | None


def read_checked(root: Path, manifest: dict[str, Any], config: MHRConfig,
                 modules: dict[str, tuple[int, int]], tasks: list) -> BundleTensors:
    """Read every tensor file the manifest lists and validate it against the config and modules."""
    K, h, r = config.n_skills, config.n_heads, config.rank

    def label(rel: str) -> Path:
        return root / stored_name(rel, manifest["files"][rel])

    def read(rel: str) -> dict[str, Tensor]:
        path = label(rel)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BundleError(f"{path}: file not found (listed in manifest.json)") from None
        if sha256(data) != manifest["files"][rel]:
            raise BundleError(f"{path}: sha256 does not match manifest.json 'files.{rel}': the file was "
                              "changed or damaged after the bundle was saved")
        try:
            return parse_safetensors(data, path)
        except FileFormatError as e:
            raise BundleError(str(e)) from None

    def need_keys(tensors: dict[str, Tensor], keys: list[str], rel: str) -> None:
        missing, extra = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
        if missing or extra:
            raise BundleError(f"{label(rel)}: missing tensor(s) {missing[:5]}, unexpected tensor(s) {extra[:5]}")

    inv = read("inventory.safetensors")
    need_keys(inv, [f"{m}.lora_{ab}" for m in modules for ab in "AB"], "inventory.safetensors")
    inv_label = label("inventory.safetensors")
    for m, (d_in, d_out) in modules.items():
        check_tensor(inv[f"{m}.lora_A"], (K, h, d_in // h, r), f"{inv_label}: tensor '{m}.lora_A'")
        check_tensor(inv[f"{m}.lora_B"], (K, h, r, d_out // h), f"{inv_label}: tensor '{m}.lora_B'")

    routing = {}
    n_routed = sum(t.kind.value == "routed" for t in tasks)
    if n_routed:
        routing = read("routing.safetensors")
        need_keys(routing, list(modules), "routing.safetensors")
        for m in modules:
            check_tensor(routing[m], (n_routed, h, K), f"{label('routing.safetensors')}: tensor '{m}'")

    def read_lora(rel: str, alpha: float, field: str) -> LoRA:
        tensors = read(rel)
        found = {k.rsplit(".lora_", 1)[0] for k in tensors}
        names = [m for m in modules if m in found] + sorted(found - set(modules))  # bundle (model) order
        need_keys(tensors, [f"{m}.lora_{ab}" for m in names for ab in "AB"], rel)
        try:
            lora = LoRA({m: tensors[f"{m}.lora_A"] for m in names}, {m: tensors[f"{m}.lora_B"] for m in names}, alpha)
        except ValueError as e:
            raise BundleError(f"{label(rel)}: {e}") from None
        check_scale(alpha, lora.rank, root / "manifest.json", field)  # the scale needs the file's rank
        check_dense_lora(lora, modules, where=str(label(rel)))
        return lora

    adapters = {t.name: read_lora(f"adapters/{t.name}.safetensors", t.alpha, f"tasks[{i}].alpha")
                for i, t in enumerate(tasks) if t.kind.value == "dense"}
    zs = manifest.get("zero_shot")
    zero_shot = read_lora("zero_shot.safetensors", zs["alpha"], "zero_shot.alpha") if zs else None
    return BundleTensors({m: inv[f"{m}.lora_A"] for m in modules}, {m: inv[f"{m}.lora_B"] for m in modules},
                         {m: routing[m] for m in modules} if routing else {}, adapters, zero_shot)
