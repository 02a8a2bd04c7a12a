"""Evaluation of bundle tasks: exact match and ROUGE-L of greedy generations, accuracy of rank classification.

Each task is evaluated with the ordinary LoRA that would serve it (materialized from its routing, its
dense adapter, or the zero-shot adapter) loaded into the backbone, per task and averaged over tasks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import mhr
from training.data import DataError, Example, collate, encode, n_targets, padding_id, task_names
from training.loop import target_nll
from training.model import model_device, model_for_bundle


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, target: str) -> float:
    """1.0 when the texts are equal up to surrounding and repeated whitespace."""
    return float(normalize(prediction) == normalize(target))


def rouge_tokens(text: str) -> list[str]:
    """Tokens as the reference ROUGE scorer makes them (and Super-NI's metric with it): lower case, every
    run of characters other than a-z and 0-9 a separator."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(prediction: str, target: str) -> float:
    """ROUGE-L F1 over `rouge_tokens`: 2PR / (P + R) with P, R = LCS / lengths. Texts without such tokens
    (punctuation only) compare as whitespace-split text."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(target)
    if not pred and not ref:
        pred, ref = prediction.split(), target.split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)  # LCS table, one row at a time
    for p in pred:
        current = [0]
        for j, r in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if p == r else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts` (left-padded into one batch), decoded without special tokens."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    length = max(len(i) for i in ids)
    pad, device = padding_id(tokenizer), model_device(model)
    input_ids = torch.tensor([[pad] * (length - len(i)) + i for i in ids], device=device)
    attention_mask = torch.tensor([[0] * (length - len(i)) + [1] * len(i) for i in ids], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    new = out if model.config.is_encoder_decoder else out[:, length:]  # a decoder-only model repeats the prompt
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new.tolist()]


@torch.no_grad()
def choose(model: nn.Module, tokenizer, example: Example, max_length: int) -> str:
    """The choice the model gives the highest log-likelihood (summed over its tokens and EOS)."""
    variants = [encode(tokenizer, Example(example.task, example.input, c), 0, max_length,
                       model.config.is_encoder_decoder) for c in example.choices]
    nll = target_nll(model, collate(variants, padding_id(tokenizer)))  # [n_choices]
    return example.choices[int(nll.argmin())]


@torch.no_grad()
def target_loss(model: nn.Module, tokenizer, examples: Sequence[Example], batch_size: int, max_length: int) -> float:
    """Mean cross-entropy per target token (target and EOS), as in training: shows progress before answers
    become exactly right."""
    encoded = [encode(tokenizer, ex, 0, max_length, model.config.is_encoder_decoder) for ex in examples]
    total, tokens = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i:i + batch_size], padding_id(tokenizer))
        total += float(target_nll(model, batch).sum())
        tokens += n_targets(batch)
    return total / tokens


def evaluate_examples(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 16,
                      max_new_tokens: int = 32, max_length: int = 256) -> dict[str, float]:
    """Metrics of one adapter on `examples`: accuracy over those with choices; exact_match, rouge_l and the
    target loss over the others (a metric is left out when no example calls for it). "n": the example count."""
    ranked = [ex for ex in examples if ex.choices is not None]
    generated = [ex for ex in examples if ex.choices is None]
    scores: dict[str, float] = {"n": len(examples)}
    if ranked:
        scores["accuracy"] = sum(choose(model, tokenizer, ex, max_length) == ex.target for ex in ranked) / len(ranked)
    if generated:
        outputs = generations(model, tokenizer, generated, batch_size, max_new_tokens)
        scores["exact_match"] = best_of(exact_match, outputs, generated)
        scores["rouge_l"] = best_of(rouge_l, outputs, generated)
        scores["loss"] = target_loss(model, tokenizer, generated, batch_size, max_length)
    return scores


def generations(model: nn.Module, tokenizer, examples: Sequence[Example], batch_size: int,
                max_new_tokens: int) -> list[str]:
    """The greedy answer to every example's prompt, `batch_size` prompts per generate call."""
    outputs = []
    for i in range(0, len(examples), batch_size):
        outputs += generate(model, tokenizer, [ex.input for ex in examples[i:i + batch_size]], max_new_tokens)
    return outputs


def per_example(metric, outputs: Sequence[str], examples: Sequence[Example]) -> list[float]:
    """`metric`'s best value over each example's answers (target and references)."""
    return [max(metric(out, answer) for answer in ex.answers) for out, ex in zip(outputs, examples, strict=True)]


def best_of(metric, outputs: Sequence[str], examples: Sequence[Example]) -> float:
    """The mean over examples of `per_example`."""
    best = per_example(metric, outputs, examples)
    return sum(best) / len(best)


def evaluate_bundle(bundle_path: str | Path, examples: Sequence[Example], *, zero_shot: bool = False,
                    backbone: str | None = None, device: torch.device | str = "cpu", **kwargs) -> dict:
    """Per-task metrics and their average over tasks, each task served by its own adapter from the bundle
    (or, with `zero_shot`, every task by the zero-shot adapter), with the model on `device`. `backbone`
    overrides where the bundle's backbone is loaded from; `kwargs` go to `evaluate_examples`."""
    bundle = mhr.Bundle.load(bundle_path)
    tasks = task_names(examples)
    if not zero_shot:
        unknown = [t for t in tasks if t not in bundle.task_names]
        if unknown:
            raise DataError(f"task(s) {unknown} are not in the bundle {bundle_path}: evaluate them zero-shot")
    model, tokenizer = model_for_bundle(bundle, n_tasks=0, backbone=backbone, device=device)
    inventory = bundle.inventory(device=device)  # materialize the tasks' LoRAs where they are used
    results = {}
    for task in tasks:
        lora = bundle.zero_shot_lora(inventory) if zero_shot else bundle.task_lora(task, inventory)
        mhr.load_lora(model, lora)
        results[task] = evaluate_examples(model, tokenizer, [ex for ex in examples if ex.task == task], **kwargs)
    return {"adapter": "zero-shot" if zero_shot else "task", "tasks": results, "average": average(results)}


def average(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The unweighted mean over tasks of every metric (over the tasks that have it)."""
    names = sorted({m for scores in results.values() for m in scores} - {"n"})
    return {m: sum(s[m] for s in results.values() if m in s) / sum(m in s for s in results.values())
            for m in names}


def format_table(report: dict) -> str:
    """A plain-text table: one row per task, then the average."""
    metrics = sorted({m for s in report["tasks"].values() for m in s} - {"n"})
    rows = [[t, str(s["n"]), *(f"{s[m]:.3f}" if m in s else "-" for m in metrics)] for t, s in report["tasks"].items()]
    rows.append(["average", "", *(f"{report['average'][m]:.3f}" for m in metrics)])
    header = ["task", "n", *metrics]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines)


def write_report(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
