"""The runs of the comparison, each a job a worker process can take: pre-train an inventory, adapt one task
from k shots, train and score the zero-shot candidates.

Every job is a plain dict in, a plain dict out (picklable across processes); a result keeps a score per
test instance, so that methods can be compared instance by instance (`training.experiments.stats`).
Leaves the choice of runs and the report to `training.experiments.compare` and `.report`.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

import mhr
from training.adapt import adaptation_data, start
from training.config import TrainConfig
from training.data import Example
from training.evaluate import evaluate_bundle, exact_match, generations, per_example, target_loss
from training.loop import train
from training.model import load_backbone, model_for_bundle
from training.pretrain import pretrain
from training.zeroshot import CANDIDATES, train_candidates

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# few-shot method label -> (inventory it starts from, adaptation method); LoRA fine-tunes the multi-task
# shared LoRA (its one skill's "average" is itself)
FEW_SHOT = {"LoRA": ("lora", "mhr-mu"), "Poly": ("poly", "poly"), "MHR": ("mhr", "mhr"),
            "MHR-z": ("mhr", "mhr-z"), "MHR-μ": ("mhr", "mhr-mu")}
ROUTED = ("Poly", "MHR", "MHR-z")  # methods that train routing logits (their own learning rate)


@dataclass(frozen=True)
class Sizes:
    """The sizes every run shares."""

    skills: int = 8
    rank: int = 4
    alpha: float = 8.0  # LoRA scale alpha / r = 2 for the skills and (alpha * K) / (r * K) for the shared LoRA
    pretrain_steps: int = 1000
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-2
    pretrain_logits_lr: float = 0.1
    adapt_batch: int = 8
    adapt_steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FEW_SHOT, 100))
    max_length: int = 48
    max_new_tokens: int = 16
    eval_batch: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


def inventory_config(sizes: Sizes, method: str, heads: int, seed: int) -> TrainConfig:
    """Multi-task pre-training of one inventory: "lora" (shared, rank K*r, the skills' scale), "poly", "mhr"."""
    rank, alpha = (sizes.rank * sizes.skills, sizes.alpha * sizes.skills) if method == "lora" \
        else (sizes.rank, sizes.alpha)
    return TrainConfig(method=method, skills=sizes.skills, heads=heads, rank=rank, alpha=alpha,
                       target_modules=list(TARGET_MODULES), steps=sizes.pretrain_steps, batch_size=sizes.pretrain_batch,
                       lr=sizes.pretrain_lr, logits_lr=sizes.pretrain_logits_lr,
                       warmup_steps=min(20, sizes.pretrain_steps // 10), seed=seed, device="cpu",
                       max_length=sizes.max_length)


def adapt_config(sizes: Sizes, label: str, seed: int, lr: float, logits_lr: float) -> TrainConfig:
    steps = sizes.adapt_steps[label]
    return TrainConfig(method=FEW_SHOT[label][1], skills=sizes.skills, rank=sizes.rank, alpha=sizes.alpha,
                       target_modules=list(TARGET_MODULES), steps=steps, batch_size=sizes.adapt_batch, lr=lr,
                       logits_lr=logits_lr, warmup_steps=min(10, steps // 10), seed=seed, device="cpu",
                       max_length=sizes.max_length)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scores(model, tokenizer, test: Sequence[Example], sizes: Sizes) -> dict:
    """Exact match per test instance (in order) and the mean target loss."""
    outputs = generations(model, tokenizer, test, sizes.eval_batch, sizes.max_new_tokens)
    return {"correct": per_example(exact_match, outputs, test),
            "loss": target_loss(model, tokenizer, test, sizes.eval_batch, sizes.max_length)}


def pretrain_job(job: dict) -> dict:
    """Pre-train one inventory on the training tasks; its exact match on held-in test words; its sizes."""
    cfg = inventory_config(job["sizes"], job["method"], job["heads"], job["seed"])
    shutil.rmtree(job["out"], ignore_errors=True)  # a rerun in the same work directory starts afresh
    bundle, result = pretrain(job["backbone"], job["train"], cfg, job["out"], progress=False)
    report = evaluate_bundle(job["out"], job["test"], max_new_tokens=job["sizes"].max_new_tokens,
                             batch_size=job["sizes"].eval_batch)
    inventory = sum(a.numel() + b.numel() for a, b in zip(bundle.lora_A.values(), bundle.lora_B.values(), strict=True))
    routing = sum(t.numel() for t in bundle.routing.values()) // len(bundle.tasks) if job["method"] != "lora" else 0
    return {"name": job["name"], "seed": job["seed"], "exact_match": report["average"]["exact_match"],
            "loss": report["average"]["loss"], "final_loss": result.final_loss, "inventory_params": inventory,
            "routing_params_per_task": routing}


def draw_shots(pool: Sequence[Example], k: int, *key) -> list[Example]:
    """A k-subset of the pool, its own for every key (pre-training seed, few-shot seed, task)."""
    if k > len(pool):
        raise ValueError(f"{k} shots from a pool of {len(pool)}")
    return random.Random("/".join(map(str, key))).sample(list(pool), k)


def fewshot_job(job: dict) -> dict:
    """Adapt one task from its shots with one method and learning rate; score it on the test instances."""
    sizes: Sizes = job["sizes"]
    label, task = job["label"], job["task"]
    cfg = adapt_config(sizes, label, job["fewshot_seed"], job["lr"], job["logits_lr"])
    bundle = mhr.Bundle.load(job["bundle"])
    model, tokenizer = load_backbone(bundle.backbone)
    start(model, bundle, cfg)
    n_params = trainable(model)
    shots = draw_shots(job["pool"], job["k"], job["seed"], job["fewshot_seed"], task)
    train(model, adaptation_data(tokenizer, shots, task, cfg), cfg, progress=False)
    if cfg.method in ("mhr", "poly", "mhr-z"):  # served as it would be: the new row, materialized
        logits = {n: layer.router.logits[0].detach() for n, layer in mhr.mhr_layers(model).items()}
        mhr.load_lora(model, mhr.SkillInventory.from_model(model).materialize_logits(logits))
    result = scores(model, tokenizer, job["test"], sizes)
    return {**{k: job[k] for k in ("label", "name", "task", "seed", "fewshot_seed", "k", "lr", "logits_lr", "stage")},
            **result, "params": n_params}


def zeroshot_job(job: dict) -> dict:
    """Train the zero-shot candidates of one MHR bundle, pick one on the validation tasks, score every
    candidate (and the pick) on the held-out tasks."""
    sizes: Sizes = job["sizes"]
    bundle = mhr.Bundle.load(job["bundle"])
    cfg = adapt_config(sizes, "MHR-μ", job["seed"], job["lr"], 0.1)
    cfg = TrainConfig(**{**cfg.to_dict(), "steps": job["steps"], "batch_size": sizes.pretrain_batch,
                         "warmup_steps": min(20, job["steps"] // 10)})
    found = train_candidates(bundle, job["train"], cfg, validation=job["validation"], eval_every=job["eval_every"],
                             max_new_tokens=sizes.max_new_tokens, progress=False)
    model, tokenizer = model_for_bundle(bundle, n_tasks=0, device="cpu")
    tested = {}
    for name in CANDIDATES:
        mhr.load_lora(model, found.loras[name])
        tested[name] = {task: scores(model, tokenizer, [ex for ex in job["test"] if ex.task == task], sizes)
                        for task in job["tasks"]}
    return {"seed": job["seed"], "validation": found.scores, "selected": found.selected, "test": tested}
