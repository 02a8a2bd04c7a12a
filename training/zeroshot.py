"""Zero-shot MHR-mu: the skills' average, trained further on the multi-task data, stored in the bundle.

The result is the bundle's zero-shot adapter, served for any task without routing of its own.
"""

from __future__ import annotations

from pathlib import Path

import mhr
from training.config import TrainConfig
from training.data import Example, TaskBatches, task_names
from training.loop import TrainResult, run_metadata, train
from training.model import model_for_bundle, seed_everything, set_trainable


def zeroshot(bundle_path: str | Path, examples: list[Example], config: TrainConfig, *, data_name: str = "",
             backbone: str | None = None, progress: bool = True) -> TrainResult:
    """Start one LoRA from the average of the bundle's skills, train it on every task of `examples` for
    `config.steps` steps (no routing), and store it with `Bundle.set_zero_shot`. `backbone` overrides
    where the bundle's backbone is loaded from."""
    bundle = mhr.Bundle.load(bundle_path)
    seed_everything(config.seed)
    # no routing rows: the average serves every task
    model, tokenizer = model_for_bundle(bundle, n_tasks=0, backbone=backbone, device=config.torch_device)
    mhr.start_average(model)
    set_trainable(model, dense=True)
    data = TaskBatches(tokenizer, examples, task_names(examples), config.batch_size, config.max_length,
                       config.seed, encoder_decoder=model.config.is_encoder_decoder)
    result = train(model, data, config, progress=progress)
    bundle = mhr.Bundle.load(bundle_path)
    bundle.set_zero_shot(mhr.dense_lora(model))
    bundle.training["zero_shot"] = run_metadata(config, data_name, len(examples), result)
    bundle.save(bundle_path)
    return result
