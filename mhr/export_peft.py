"""Convert between mhr's LoRA and the standard PEFT LoRA directory that PEFT and vLLM load.

A PEFT LoRA directory holds adapter_config.json (peft_type "LORA", r, lora_alpha, target_modules, ...)
and adapter_model.safetensors with keys "base_model.model.<module>.lora_A.weight" [r, d_in] and
"...lora_B.weight" [d_out, r] (nn.Linear layout, the transpose of mhr's A [d_in, r], B [r, d_out]).
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

from mhr.adapter import LoRA
from mhr.files import FileFormatError, read_json_object, read_safetensors, safetensors_bytes, write_atomic

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
        write_atomic(tmp / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
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
    Refused with a clear error: DoRA, modules_to_save, trained biases, Conv1D layouts, pickle weights.
    """
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir / CONFIG_FILE)
    weights_path = adapter_dir / WEIGHTS_FILE
    if not weights_path.exists() and (adapter_dir / "adapter_model.bin").exists():
        raise PeftFormatError(f"{adapter_dir / 'adapter_model.bin'}: pickle weights are never loaded; "
                              "convert the adapter to safetensors (PEFT: save_pretrained(safe_serialization=True))")
    try:
        tensors = read_safetensors(weights_path)
    except FileFormatError as e:
        raise PeftFormatError(str(e)) from None
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
        if B[m].dim() != 2 or A[m].dim() != 2 or B[m].shape[1] != r_m:
            raise PeftFormatError(f"{weights_path}: module {m!r}: lora_A {list(A[m].shape)} and lora_B "
                                  f"{list(B[m].shape)} are not [r, d_in] and [d_out, r]")
        scaling = _module_scaling(config, m, r_m)
        out_A[m] = torch.nn.functional.pad(A[m].T.float(), (0, rank - r_m))               # [d_in, rank]
        out_B[m] = torch.nn.functional.pad(B[m].T.float() * scaling, (0, 0, 0, rank - r_m))  # [rank, d_out]
    return LoRA(out_A, out_B, alpha=float(rank))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = read_json_object(path, "a PEFT adapter directory")
    except FileFormatError as e:
        raise PeftFormatError(str(e)) from None
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
        value = config.get(field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise PeftFormatError(f"{path}: field '{field}' must be a number > 0, found {value!r}")
    return config


def _module_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling for one module: lora_alpha / r (or / sqrt(r) with rsLoRA), with per-module patterns."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key that, read as a regular expression,
    matches the whole module name or a dotted suffix of it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
