"""Few-shot adaptation of a new task from a bundle, added to the bundle as one more task.

Methods (what trains -> what is stored):
    mhr, poly   a fresh routing row + the inventory  -> the materialized task LoRA, as a dense task
    mhr-z       a fresh routing row only             -> the row, as a routed task ([h, K] logits per module)
    mhr-mu      the skills' average, as one LoRA      -> that LoRA, as a dense task
    lora        a fresh LoRA of the bundle's rank     -> that LoRA, as a dense task
"poly" and "mhr" are one procedure: the bundle's own number of heads makes the difference.

`adapt` runs it offline on a backbone it loads; the server's adaptation jobs (`server.http.jobs`) run the same
steps (`start`, `adaptation_data`, `training.loop.Optimization`, `adapted`) on the backbone it serves.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

import mhr
from training.config import ADAPT_METHODS, TrainConfig
from training.data import DataError, Example, TaskBatches
from training.loop import TrainResult, run_metadata, train
from training.model import add_inventory, load_backbone, seed_everything, set_trainable


def fresh_lora(model: nn.Module, config: mhr.MHRConfig) -> None:
    """Give every MHR layer a new dense LoRA of the inventory's rank and scaling: B = 0, A initialised
    as the inventory's skills are (mttl: uniform bound 1/sqrt(3 d_in); kaiming: bound 1/sqrt(d_in))."""
    for layer in mhr.mhr_layers(model).values():
        d_in, r = layer.in_features, config.rank
        bound = 1.0 / math.sqrt(d_in if config.init == "kaiming" else 3 * d_in)
        A = torch.empty(d_in, r).uniform_(-bound, bound)
        layer.load_dense(A, torch.zeros(r, layer.out_features), config.scaling)


def prepare(model: nn.Module, method: str, config: mhr.MHRConfig) -> None:
    """Set up the layers of a model holding the bundle's inventory and one fresh routing row for `method`."""
    if method in ("mhr", "poly"):
        set_trainable(model, skills=True, routing=True)
    elif method == "mhr-z":
        set_trainable(model, routing=True)
    elif method == "mhr-mu":
        mhr.start_average(model)
        set_trainable(model, dense=True)
    else:  # lora
        fresh_lora(model, config)
        set_trainable(model, dense=True)


def start(model: nn.Module, bundle: mhr.Bundle, config: TrainConfig) -> None:
    """Make `model` (the bundle's backbone, without MHR layers) ready to adapt one new task with
    `config.method`: seeded, the bundle's inventory with one fresh routing row, what the method trains unfrozen."""
    config.require_method(ADAPT_METHODS, "adapt")
    seed_everything(config.seed)
    add_inventory(model, bundle, n_tasks=1)
    prepare(model, config.method, bundle.config)


def adaptation_data(tokenizer, examples: list[Example], task: str, config: TrainConfig,
                    encoder_decoder: bool = False) -> TaskBatches:
    """The batches an adaptation trains on: `examples`, all of `task` (DataError otherwise)."""
    others = sorted({ex.task for ex in examples} - {task})
    if others:
        raise DataError(f"adaptation data for task {task!r} also holds task(s) {others}")
    return TaskBatches(tokenizer, examples, [task], config.batch_size, config.max_length, config.seed,
                       encoder_decoder=encoder_decoder)


def adapted(model: nn.Module, method: str) -> dict[str, Tensor] | mhr.LoRA:
    """The adapted task in the form its method stores (see the module docstring): routing logits [h, K] per
    module for mhr-z, else a dense LoRA."""
    logits = {name: layer.router.logits[0].detach().clone() for name, layer in mhr.mhr_layers(model).items()}
    if method == "mhr-z":
        return logits
    if method in ("mhr", "poly"):
        return mhr.SkillInventory.from_model(model).materialize_logits(logits)  # the inventory moved too
    return mhr.dense_lora(model)


def store(bundle: mhr.Bundle, task: str, adapter: dict[str, Tensor] | mhr.LoRA, metadata: dict,
          replace: bool) -> None:
    """Add the adapted task (`adapted`) to `bundle`."""
    if isinstance(adapter, mhr.LoRA):
        bundle.add_dense_task(task, adapter, replace=replace, metadata=metadata)
    else:
        bundle.add_routed_task(task, adapter, replace=replace, metadata=metadata)


def adapt(bundle_path: str | Path, examples: list[Example], task: str, config: TrainConfig, *,
          data_name: str = "", replace: bool = False, backbone: str | None = None,
          progress: bool = True) -> TrainResult:
    """Train `task` on `examples` (all of that task) with `config.method`; add it to the bundle on disk.

    The bundle is read again just before the task is added, so training takes no lock and a concurrent
    change to the bundle in the meantime is kept (or, if it touched the same revision, refused by save).
    `backbone` overrides where the bundle's backbone is loaded from.
    """
    config.require_method(ADAPT_METHODS, "adapt")
    bundle = mhr.Bundle.load(bundle_path)
    if task in bundle.task_names and not replace:
        raise mhr.BundleError(f"task {task!r} is already in {bundle_path}: pass replace to overwrite it")
    model, tokenizer = load_backbone(backbone or bundle.backbone, device=config.torch_device)
    bundle.check_backbone(model)
    data = adaptation_data(tokenizer, examples, task, config, encoder_decoder=model.config.is_encoder_decoder)
    start(model, bundle, config)
    result = train(model, data, config, progress=progress)
    bundle = mhr.Bundle.load(bundle_path)
    store(bundle, task, adapted(model, config.method), run_metadata(config, data_name, len(examples), result),
          replace)
    bundle.save(bundle_path)
    return result
