"""The comparison's results: per-instance scores gathered into arrays, intervals, and the markdown page.

`summarize` turns the runs of `training.experiments.compare` into results.json's content (means, paired
bootstrap intervals of the differences the paper's claims rest on, parameters, chosen learning rates);
`markdown` renders it. Leaves running anything to `compare` and the statistics to `stats`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.experiments.runs import FEW_SHOT
from training.experiments.stats import bootstrap, paired

ANALYSIS = "<!-- analysis -->"
# (name, a, b): the few-shot differences a - b that the paper's claims rest on
FEW_SHOT_CLAIMS = (("MHR − Poly", "MHR", "Poly"), ("MHR − LoRA", "MHR", "LoRA"), ("MHR-z − MHR", "MHR-z", "MHR"),
                   ("MHR-μ − MHR", "MHR-μ", "MHR"))
ZERO_SHOT_NAMES = {"backbone": "backbone alone", "average": "plain skill average (MHR-μ)",
                   "trained": "MHR-μ + multi-task steps (early-stopped)", "served": "picked on validation (served)"}


def scores_array(runs: list[dict], seeds: list, fewshot_seeds: list, tasks: list) -> np.ndarray:
    """Exact match per instance of the runs of one method: [seeds, few-shot seeds, tasks, instances]."""
    index = {(r["seed"], r["fewshot_seed"], r["task"]): r["correct"] for r in runs}
    return np.array([[[index[(s, f, t)] for t in tasks] for f in fewshot_seeds] for s in seeds], dtype=float)


def few_shot_arrays(fewshot: list[dict], settings: dict, loss: bool = False) -> dict[str, np.ndarray]:
    """Per method (and ablation variant), its runs as an array over the few-shot seeds it ran: exact match
    per test instance, or (`loss`) each run's mean target loss as one value."""
    arrays = {}
    for name in dict.fromkeys(r["name"] for r in fewshot):
        runs = [r if not loss else {**r, "correct": [r["loss"]]} for r in fewshot if r["name"] == name]
        fewshot_seeds = sorted({r["fewshot_seed"] for r in runs})
        arrays[name] = scores_array(runs, range(settings["seeds"]), fewshot_seeds, settings["tasks"])
    return arrays


def zero_shot_arrays(zero: list[dict], tasks: list) -> dict[str, np.ndarray]:
    """Per candidate, and for the one validation picked per seed: [seeds, 1, tasks, instances]."""
    zero = sorted(zero, key=lambda z: z["seed"])
    arrays = {name: np.array([[[z["test"][name][t]["correct"] for t in tasks]] for z in zero], dtype=float)
              for name in ("backbone", "average", "trained")}
    arrays["served"] = np.array([[[z["test"][z["selected"]][t]["correct"] for t in tasks]] for z in zero],
                                dtype=float)
    return arrays


def ablation(arrays: dict[str, np.ndarray], settings: dict) -> dict:
    """Few-shot exact match of MHR per number of heads (h = 1 is Poly) and its difference from h = 1."""
    by_heads = {h: arrays["Poly"] if h == 1 else arrays["MHR"] if h == settings["heads"] else arrays[f"MHR h={h}"]
                for h in settings["ablation_heads"]}
    n = min(a.shape[1] for a in by_heads.values())  # the ablation's own runs may use fewer few-shot seeds
    by_heads = {h: a[:, :n] for h, a in by_heads.items()}
    return {str(h): {"exact_match": bootstrap(a).to_dict(), "minus_h1": paired(a, by_heads[1]).to_dict()}
            for h, a in by_heads.items()}


def summarize(settings: dict, sizes: dict, backbone: dict, pretrained: list[dict], rates: dict,
              fewshot: list[dict], zero: list[dict]) -> dict:
    arrays, losses = few_shot_arrays(fewshot, settings), few_shot_arrays(fewshot, settings, loss=True)
    params = {r["name"]: r["params"] for r in fewshot}
    few = {name: {"exact_match": bootstrap(a).to_dict(), "params": params[name],
                  "loss": float(np.mean([r["loss"] for r in fewshot if r["name"] == name]))}
           for name, a in arrays.items()}
    zarrays = zero_shot_arrays(zero, settings["tasks"])
    pre = {}
    for r in pretrained:
        entry = pre.setdefault(r["name"], {"runs": [], "inventory_params": r["inventory_params"],
                                           "routing_params_per_task": r["routing_params_per_task"]})
        entry["runs"].append({"seed": r["seed"], "exact_match": r["exact_match"], "loss": r["loss"]})
    for entry in pre.values():
        entry["exact_match"] = float(np.mean([x["exact_match"] for x in entry["runs"]]))
    return {
        "settings": settings, "sizes": sizes, "backbone": backbone, "pretrain": pre, "learning_rates": rates,
        "few_shot": few,
        "differences": {name: paired(arrays[a], arrays[b]).to_dict() for name, a, b in FEW_SHOT_CLAIMS},
        "loss_differences": {name: paired(losses[a], losses[b]).to_dict() for name, a, b in FEW_SHOT_CLAIMS},
        "ablation": ablation(arrays, settings),
        "zero_shot": {
            "scores": {n: bootstrap(a).to_dict() for n, a in zarrays.items()},
            "minus_backbone": {n: paired(a, zarrays["backbone"]).to_dict() for n, a in zarrays.items()
                               if n != "backbone"},
            "selected": {str(z["seed"]): z["selected"] for z in zero},
            "validation": {str(z["seed"]): z["validation"] for z in zero}},
        # every run's own scores: `resummarize` recomputes everything above from them
        "runs": {"pretrained": pretrained, "rates": rates, "fewshot": fewshot, "zero": zero},
    }


def resummarize(results: dict) -> dict:
    """`summarize` again from a results.json's runs (after a change of the report, without running again)."""
    keep = {k: results[k] for k in ("command", "minutes") if k in results}
    runs = results["runs"]
    return {**summarize(results["settings"], results["sizes"], results["backbone"], runs["pretrained"],
                        runs["rates"], runs["fewshot"], runs["zero"]), **keep}


def _ci(d: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(d['mean'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def _shown(path: str) -> str:
    """A path inside the repository as relative to it (the same page on every machine), others as given."""
    root = Path(__file__).resolve().parents[2]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def _settings_lines(r: dict) -> list[str]:
    s, z, recipe = r["settings"], r["sizes"], r["backbone"].get("recipe", {})
    return [
        f"- Backbone: `{_shown(s['backbone'])}` (version {r['backbone'].get('backbone_version', '?')}: "
        f"{recipe.get('layers', '?')} layers, hidden {recipe.get('hidden', '?')}, pre-trained on generic text "
        "and word skills that are none of the suite's tasks; `training/backbone.py`).",
        f"- Suite v2 (`training/suite.py`): 62 training tasks x {s['n_train']} instances, prompts that do not name "
        f"the task (\"kabadu ->\"); {len(s['tasks'])} held-out tasks x {s['n_test']} test words; "
        f"{len(s['validation_tasks'])} validation tasks (their own words) for learning rates and the zero-shot pick.",
        f"- Inventories: K = {z['skills']} skills of rank {z['rank']} on all seven linear layers per block, scale "
        f"alpha / r = {z['alpha'] / z['rank']:g}; MHR h = {s['heads']}, Poly h = 1, shared LoRA rank "
        f"{z['skills'] * z['rank']} at the same scale. Pre-training {z['pretrain_steps']} steps of "
        f"{z['pretrain_batch']}, lr {z['pretrain_lr']:g} (adapters), {z['pretrain_logits_lr']:g} (logits); "
        f"{s['seeds']} pre-training seeds.",
        f"- Few-shot: k = {s['shots']} from a pool of {s['pool']} per task, {s['fewshot_seeds']} few-shot seeds per "
        f"pre-training seed (each its own k-subset and init), batch {z['adapt_batch']}; steps per method: "
        + ", ".join(f"{k} {v}" for k, v in z["adapt_steps"].items()) + ".",
        f"- Learning rates from the grid lr {s['lr_grid']} x logits lr {s['logits_lr_grid']} (routed methods), "
        "chosen by exact match on the validation tasks (pre-training seed 0, few-shot seed 0).",
        f"- Zero-shot: {s['zeroshot_steps']} extra multi-task steps of the skills' average, scored on the validation "
        f"tasks every {max(1, s['zeroshot_steps'] // 8)} steps; best step kept.",
        "- Exact match, greedy decoding. Intervals: paired bootstrap 95%, 2000 replicates, resampling pre-training "
        "seeds, tasks and test words (few-shot seeds averaged in each pairing).",
    ]


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = ["# Results: the paper's claims on the task suite", "",
             f"Made by `{r['command']}` (`make results`) in {r['minutes']:.0f} minutes (fp32, CPU, "
             f"{s['threads']} torch thread per process, {s['jobs']} processes).", "", "## Settings", "",
             *_settings_lines(r), "", "## Multi-task pre-training (training tasks, held-in test words)", "",
             "| inventory | exact match (mean over seeds) | per seed | adapter weights | routing per task |",
             "| --- | ---: | --- | ---: | ---: |"]
    for name, p in r["pretrain"].items():
        runs = ", ".join(f"{x['exact_match']:.3f}" for x in p["runs"])
        lines.append(f"| {name} | {p['exact_match']:.3f} | {runs} | {p['inventory_params']:,} | "
                     f"{p['routing_params_per_task']:,} |")
    lines += ["", "## Few-shot adaptation of the held-out tasks", "",
              "Exact match, mean and 95% interval.", "",
              "| method | exact match | loss | trainable parameters | lr | logits lr |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in FEW_SHOT:
        f, lr = r["few_shot"][name], r["learning_rates"][name]
        logits = f"{lr['logits_lr']:g}" if name in ("Poly", "MHR", "MHR-z") else "-"
        lines.append(f"| {name} | {_ci(f['exact_match'])} | {f['loss']:.3f} | {f['params']:,} | {lr['lr']:g} | "
                     f"{logits} |")
    lines += ["", "Differences (paired):", "", "| difference | exact match | half-width |", "| --- | ---: | ---: |"]
    lines += [f"| {n} | {_ci(d, True)} | {d['half_width']:.3f} |" for n, d in r["differences"].items()]
    lines += ["", "The same differences in target loss (nats per token, lower is better; one value per run, so the "
              "interval resamples seeds and tasks):", "", "| difference | loss |", "| --- | ---: |"]
    lines += [f"| {n} | {_ci(d, True)} |" for n, d in r["loss_differences"].items()]
    lines += ["", "## Head ablation (MHR few-shot, same K, r and steps)", "",
              f"The first {s['ablation_fewshot_seeds']} few-shot seed(s) of each pre-training seed.", "",
              "| heads | exact match | minus h = 1 (Poly) |", "| ---: | ---: | ---: |"]
    lines += [f"| {h} | {_ci(a['exact_match'])} | {_ci(a['minus_h1'], True)} |" for h, a in r["ablation"].items()]
    z = r["zero_shot"]
    lines += ["", "## Zero-shot on the held-out tasks", "", "| adapter | exact match | minus backbone |",
              "| --- | ---: | ---: |"]
    for key, label in ZERO_SHOT_NAMES.items():
        minus = _ci(z["minus_backbone"][key], True) if key in z["minus_backbone"] else "-"
        lines.append(f"| {label} | {_ci(z['scores'][key])} | {minus} |")
    picks = ", ".join(f"seed {k}: {v}" for k, v in z["selected"].items())
    lines += ["", f"Picked on the validation tasks: {picks}.", "", "## Routing", "",
              "![routing of the MHR bundle](routing.png)", "",
              "Per head: tasks x skills, routing weights averaged over layers (seed 0); right: task similarity.", ""]
    return "\n".join(lines)
