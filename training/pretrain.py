"""Multi-task pre-training of a skill inventory (shared LoRA, Poly or MHR), written out as a bundle."""

from __future__ import annotations

from pathlib import Path

import mhr
from training.config import PRETRAIN_METHODS, TrainConfig
from training.data import Example, TaskBatches, task_names
from training.distributed import SINGLE, World
from training.loop import TrainResult, run_metadata, train
from training.model import load_backbone, seed_everything, set_trainable


def pretrain(backbone: str, examples: list[Example], config: TrainConfig, out: str | Path, *,
             data_name: str = "", eval_examples: list[Example] | None = None,
             progress: bool = True, world: World = SINGLE) -> tuple[mhr.Bundle, TrainResult]:
    """Train an inventory with one routing row per task of `examples` and save the bundle at `out`.

    Tasks get routing rows in sorted name order; every task of the data becomes a routed task. With
    several processes, each trains on its share of every batch (on its own GPU when `config.device` is a
    CUDA device) and rank 0 writes the bundle.
    """
    config.require_method(PRETRAIN_METHODS, "train")
    seed_everything(config.seed)
    model, tokenizer = load_backbone(backbone, device=world.device(config.torch_device))
    tasks = task_names(examples)
    mhr_config = config.mhr_config()
    mhr.inject(model, mhr_config, len(tasks))
    # A shared LoRA has one skill whose normalised weight is 1 whatever the logits: nothing to route.
    set_trainable(model, skills=True, routing=config.method != "lora")
    encoder_decoder = model.config.is_encoder_decoder
    data = TaskBatches(tokenizer, examples, tasks, config.batch_size, config.max_length, config.seed,
                       rank=world.rank, n_ranks=world.size, encoder_decoder=encoder_decoder)
    eval_data = None
    if eval_examples:
        eval_data = TaskBatches(tokenizer, eval_examples, tasks, config.batch_size, config.max_length, config.seed,
                                encoder_decoder=encoder_decoder)
    result = train(model, data, config, eval_data=eval_data, progress=progress, world=world)
    metadata = {**run_metadata(config, data_name, len(examples), result), "processes": world.size}
    # a local directory is recorded as an absolute path, so the bundle loads from any working directory
    name = str(Path(backbone).resolve()) if Path(backbone).is_dir() else backbone
    bundle = mhr.Bundle.from_model(model, mhr_config, name, tasks, training=metadata)
    if world.is_main:
        bundle.save(out)
    return bundle, result
