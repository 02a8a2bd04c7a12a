"""Convert between mhr's LoRA and the standard PEFT LoRA directory that PEFT and vLLM load.

A PEFT LoRA directory holds adapter_config.json (peft_type "LORA", r, lora_alpha, target_modules, ...)
and adapter_model.safetensors with keys "base_model.model.<module>.lora_A.weight" [r, d_in] and
"...lora_B.weight" [d_out, r] (nn.Linear layout, the transpose of mhr's A [d_in, r], B [r, d_out]).
Imports read a directory (`import_peft`) or the two files' bytes (`import_peft_files`, for uploads that
never touch the disk); every alpha and per-module scale must be finite and within `MAX_SCALING`.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from mhr.adapter import MAX_SCALING, LoRA, scale_problem
from mhr.files import (
    FileFormatError,
    parse_json_object,
    parse_safetensors,
    read_json_object,
    read_safetensors,
    safetensors_bytes,
    write_atomic,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class PeftFormatError(ValueError):
    """A PEFT adapter directory that cannot be imported; the message names the file and the field."""


def export_peft(lora: LoRA, out_dir: str | Path, base_model_name_or_path: str, *,
                task_type: str = "CAUSAL_LM", overwrite: bool = False) -> Path:
    """Write `lora` as a PEFT LoRA directory at `out_dir`; returns the path.

    The directory appears complete or not at all (written beside it, then renamed into place).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists: pass overwrite=True to replace it")
    problem = scale_problem(lora.alpha, lora.rank)
    if problem:  # PEFT would load it, and serve padding
        raise ValueError(f"cannot export a LoRA whose alpha {problem}")
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        # PEFT matches a module whose name ends with an entry; the last name component of every
        # adapted module is the short form both PEFT and vLLM expect.
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in lora.modules}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for m in lora.modules:
        tensors[f"{PREFIX}{m}.lora_A.weight"] = lora.A[m].T  # [r, d_in]
        tensors[f"{PREFIX}{m}.lora_B.weight"] = lora.B[m].T  # [d_out, r]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 would survive the rename and hide the adapter from a server running as
    # another user; mkdir honours the umask like any directory PEFT writes.
    tmp = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(8)}.tmp")
    tmp.mkdir()
    try:
        write_atomic(tmp / CONFIG_FILE, (json.dumps(config, indent=2, allow_nan=False) + "\n").encode())
        write_atomic(tmp / WEIGHTS_FILE, safetensors_bytes(tensors))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def import_peft(adapter_dir: str | Path) -> LoRA:
    """Read a PEFT LoRA directory as an mhr LoRA over the same module names.

    Per-module ranks and alphas (rank_pattern, alpha_pattern, rsLoRA) are folded exactly into one LoRA:
    each module's scaling is multiplied into its B, ranks are zero-padded to the largest, alpha = rank.
    Refused with a clear error: DoRA, modules_to_save, trained biases, Conv1D layouts, pickle weights,
    an alpha that is not finite and > 0, a module scaling above MAX_SCALING.
    """
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    try:
        config = _checked_config(read_json_object(config_path, "a PEFT adapter directory"), config_path)
    except FileFormatError as e:
        raise PeftFormatError(str(e)) from None
    if not weights_path.exists() and (adapter_dir / "adapter_model.bin").exists():
        raise PeftFormatError(f"{adapter_dir / 'adapter_model.bin'}: pickle weights are never loaded; "
                              "convert the adapter to safetensors (PEFT: save_pretrained(safe_serialization=True))")
    try:
        tensors = read_safetensors(weights_path)
    except FileFormatError as e:
        raise PeftFormatError(str(e)) from None
    return _folded(config, tensors, config_path, weights_path)


def import_peft_files(config: bytes, weights: bytes) -> LoRA:
    """`import_peft` of a directory's two files given as bytes; errors name the files by their bare names."""
    config_path, weights_path = Path(CONFIG_FILE), Path(WEIGHTS_FILE)
    try:
        checked = _checked_config(parse_json_object(config, config_path), config_path)
        return _folded(checked, parse_safetensors(weights, weights_path), config_path, weights_path)
    except FileFormatError as e:
        raise PeftFormatError(str(e)) from None


def _folded(config: dict[str, Any], tensors: dict[str, torch.Tensor], config_path: Path,
            weights_path: Path) -> LoRA:
    """One LoRA of a checked adapter config and its weights, every module's scaling folded into its B."""
    A, B = {}, {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        for part, store in ((".lora_A.weight", A), (".lora_B.weight", B)):
            if name.endswith(part):
                store[name[: -len(part)]] = t
                break
        else:
            raise PeftFormatError(f"{weights_path}: unexpected tensor {key!r}: only lora_A/lora_B weights of "
                                  "linear layers are supported")
    if A.keys() != B.keys() or not A:
        raise PeftFormatError(f"{weights_path}: lora_A and lora_B tensors do not pair up: "
                              f"{sorted(A.keys() ^ B.keys())[:5] or 'no LoRA tensors'}")
    rank = max(a.shape[0] for a in A.values())
    out_A, out_B = {}, {}
    for m in A:
        r_m = A[m].shape[0]
        if B[m].dim() != 2 or A[m].dim() != 2 or B[m].shape[1] != r_m or r_m == 0:
            raise PeftFormatError(f"{weights_path}: module {m!r}: lora_A {list(A[m].shape)} and lora_B "
                                  f"{list(B[m].shape)} are not [r, d_in] and [d_out, r]")
        scaling = _module_scaling(config, m, r_m, config_path)
        out_A[m] = torch.nn.functional.pad(A[m].T.float(), (0, rank - r_m))               # [d_in, rank]
        out_B[m] = torch.nn.functional.pad(B[m].T.float() * scaling, (0, 0, 0, rank - r_m))  # [rank, d_out]
    return LoRA(out_A, out_B, alpha=float(rank))


def _checked_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """`config` (adapter_config.json, read from `path`) if this importer supports it; PeftFormatError if not."""
    refusals = {
        "peft_type": (config.get("peft_type") != "LORA", "only LORA adapters can be imported"),
        "use_dora": (bool(config.get("use_dora")), "DoRA adapters are not supported"),
        "modules_to_save": (bool(config.get("modules_to_save")),
                            "adapters that retrain whole modules are not supported"),
        "bias": (config.get("bias", "none") != "none", "LoRA biases are not supported"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out")), "Conv1D (fan_in_fan_out) layouts are not supported"),
    }
    for field, (bad, why) in refusals.items():
        if bad:
            raise PeftFormatError(f"{path}: field '{field}' = {config.get(field)!r}: {why}")
    for field in ("r", "lora_alpha"):
        if scale_problem(config.get(field), None):
            raise PeftFormatError(f"{path}: field '{field}' must be a number > 0 and finite, "
                                  f"found {config.get(field)!r}")
    if not isinstance(config.get("alpha_pattern") or {}, dict):
        raise PeftFormatError(f"{path}: field 'alpha_pattern' must be an object, found {config['alpha_pattern']!r}")
    return config


def _module_scaling(config: dict[str, Any], module: str, rank: int, path: Path) -> float:
    """PEFT's scaling for one module: lora_alpha / r (or / sqrt(r) with rsLoRA), with per-module patterns;
    PeftFormatError (naming `path` and the field) unless the alpha is finite and > 0 and the scaling is at
    most MAX_SCALING."""
    key = _pattern_key(config.get("alpha_pattern") or {}, module, path)
    alpha, field = (config["lora_alpha"], "lora_alpha") if key is None else (config["alpha_pattern"][key],
                                                                             f"alpha_pattern.{key}")
    problem = scale_problem(alpha, None)
    if problem:
        raise PeftFormatError(f"{path}: field '{field}' (module {module!r}): alpha {problem}")
    rslora = bool(config.get("use_rslora"))
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    if scaling > MAX_SCALING:
        raise PeftFormatError(f"{path}: field '{field}' (module {module!r}): the scaling alpha / "
                              f"{'sqrt(r)' if rslora else 'r'} = {scaling:.3g} (r = {rank}) is above "
                              f"{MAX_SCALING:g}, the bound on LoRA scales")
    return scaling


def _pattern_key(pattern: dict[str, Any], module: str, path: Path) -> str | None:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key that, read as a regular expression,
    matches the whole module name or a dotted suffix of it (None: no key matches)."""
    for key in pattern:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as e:
            raise PeftFormatError(f"{path}: field 'alpha_pattern': key {key!r} is not a regular expression "
                                  f"({e})") from None
    return None
