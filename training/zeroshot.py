"""Zero-shot MHR-mu: the skills' average, trained further on the multi-task data, stored in the bundle.

The result is the bundle's zero-shot adapter, served for any task without routing of its own. Given
validation data (instances of tasks the bundle was not trained on), the extra steps are early-stopped and
the adapter is chosen among three candidates by their validation score, so that it never does worse there
than the backbone alone:

    backbone   no adapter (stored as the average's A with B = 0: the backbone's outputs exactly)
    average    the plain average of the skills (stored as no zero-shot file: the format's fallback)
    trained    the average after the extra steps, at the step that scored best

The bundle's `training["zero_shot"]` records every candidate's score and the one `selected`; a server
names the adapter it serves after that field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import mhr
from training.config import TrainConfig
from training.data import Example, TaskBatches, task_names
from training.evaluate import average, evaluate_examples
from training.loop import TrainResult, run_metadata, train
from training.model import model_for_bundle, seed_everything, set_trainable

CANDIDATES = ("backbone", "average", "trained")


def validation_score(model, tokenizer, examples: Sequence[Example], max_new_tokens: int) -> dict[str, float]:
    """Exact match and loss on `examples`, averaged over their tasks (the model is left in eval mode)."""
    model.eval()
    per_task = {t: evaluate_examples(model, tokenizer, [ex for ex in examples if ex.task == t], batch_size=64,
                                     max_new_tokens=max_new_tokens) for t in task_names(examples)}
    scores = average(per_task)
    return {"exact_match": scores["exact_match"], "loss": scores["loss"]}


def _key(score: dict[str, float]) -> tuple[float, float]:
    """Higher exact match first, then lower loss; ties go to the simpler candidate (earlier in the list)."""
    return score["exact_match"], -score["loss"]


@dataclass
class Candidates:
    """The zero-shot candidates' LoRAs and validation scores (none without validation data), and the pick."""

    loras: dict[str, mhr.LoRA]
    scores: dict[str, dict] = field(default_factory=dict)
    selected: str = "trained"
    result: TrainResult | None = None


def train_candidates(bundle: mhr.Bundle, examples: list[Example], config: TrainConfig, *,
                     validation: Sequence[Example] | None = None, eval_every: int = 0, max_new_tokens: int = 24,
                     backbone: str | None = None, progress: bool = True) -> Candidates:
    """Train the skills' average on every task of `examples` for `config.steps` steps (no routing); with
    `validation`, score the candidates on it (the trained one every `eval_every` steps and at the end,
    keeping its best step) and select the best."""
    seed_everything(config.seed)
    # no routing rows: the average serves every task
    model, tokenizer = model_for_bundle(bundle, n_tasks=0, backbone=backbone, device=config.torch_device)
    average_lora = bundle.inventory(device=config.torch_device).average()
    found = Candidates({"backbone": _no_update(average_lora), "average": average_lora})
    if validation:
        mhr.load_lora(model, found.loras["backbone"])
        found.scores["backbone"] = validation_score(model, tokenizer, validation, max_new_tokens)
    mhr.start_average(model)
    set_trainable(model, dense=True)
    if validation:
        found.scores["average"] = validation_score(model, tokenizer, validation, max_new_tokens)

    def keep_best(step: int) -> None:
        if not validation or (step % max(1, eval_every) and step != config.steps):
            return
        score = validation_score(model, tokenizer, validation, max_new_tokens)
        model.train()
        if "trained" not in found.scores or _key(score) > _key(found.scores["trained"]):
            found.scores["trained"], found.loras["trained"] = {**score, "step": step}, mhr.dense_lora(model)

    data = TaskBatches(tokenizer, examples, task_names(examples), config.batch_size, config.max_length,
                       config.seed, encoder_decoder=model.config.is_encoder_decoder)
    found.result = train(model, data, config, progress=progress, after_step=keep_best)
    if validation:
        found.selected = max(CANDIDATES, key=lambda name: _key(found.scores[name]))  # the first of equals
    else:
        found.loras["trained"] = mhr.dense_lora(model)
    return found


def zeroshot(bundle_path: str | Path, examples: list[Example], config: TrainConfig, *, data_name: str = "",
             validation: Sequence[Example] | None = None, eval_every: int = 0, max_new_tokens: int = 24,
             backbone: str | None = None, progress: bool = True) -> TrainResult:
    """Train the zero-shot candidates (`train_candidates`) and store the selected one in the bundle with
    `Bundle.set_zero_shot` (the plain average as no file); `backbone` overrides where the bundle's backbone
    is loaded from."""
    found = train_candidates(mhr.Bundle.load(bundle_path), examples, config, validation=validation,
                             eval_every=eval_every, max_new_tokens=max_new_tokens, backbone=backbone,
                             progress=progress)
    bundle = mhr.Bundle.load(bundle_path)
    bundle.set_zero_shot(None if found.selected == "average" else found.loras[found.selected])
    bundle.training["zero_shot"] = {**run_metadata(config, data_name, len(examples), found.result),
                                    "selected": found.selected, "candidates": found.scores,
                                    "validation_examples": len(validation or ()),
                                    "validation_tasks": task_names(validation) if validation else []}
    bundle.save(bundle_path)
    return found.result


def _no_update(lora: mhr.LoRA) -> mhr.LoRA:
    """A LoRA over the same modules whose update is zero (B = 0): the backbone's own outputs."""
    return mhr.LoRA({m: a.clone() for m, a in lora.A.items()}, {m: torch.zeros_like(b) for m, b in lora.B.items()},
                    alpha=lora.alpha)
