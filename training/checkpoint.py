"""Run-state checkpoints: save the state a run needs to continue exactly, find the latest, restore it.

A checkpoint is a directory `step-<N>/` holding `tensors.safetensors` (trainable parameters, optimizer
moments, RNG state) and `state.json` (step, optimizer hyperparameters, scheduler state). Nothing is
pickled. The data stream needs no state (see `training.data.TaskSampler`); the final adapter goes to a
bundle, not here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training.model import model_device

KEEP = 2  # checkpoints kept; older ones are deleted after a newer one is complete
PREFIX = "step-"


def save(directory: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler) -> Path:
    """Write the state after `step` optimizer steps; the checkpoint appears complete or not at all."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    device = model_device(model)
    if device.type == "cuda":  # routing noise and dropout are drawn on the model's GPU
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    state = {"step": step, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict()}
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / "tensors.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        final = directory / f"{PREFIX}{step:08d}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoints(directory)[:-KEEP]:
        shutil.rmtree(old)
    return final


def latest(directory: str | Path) -> Path | None:
    """The most recent complete checkpoint in `directory`, if any."""
    found = _checkpoints(Path(directory)) if Path(directory).is_dir() else []
    return found[-1] if found else None


def restore(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Load a checkpoint into a model/optimizer/scheduler built as for the saved run; returns its step."""
    path = Path(path)
    tensors = load_file(path / "tensors.safetensors")
    state = json.loads((path / "state.json").read_text())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("param."): t for k, t in tensors.items() if k.startswith("param.")}
    if saved.keys() != params.keys():
        raise ValueError(f"{path}: the checkpoint's trainable parameters differ from the model's: "
                         f"{sorted(saved.keys() ^ params.keys())[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optim_state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state.setdefault(int(index), {})[name] = t
    # load_state_dict moves the moments onto their parameters' device (AdamW's step count stays on the CPU)
    optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    device = model_device(model)
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return state["step"]


def _checkpoints(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"{PREFIX}*") if p.is_dir())
