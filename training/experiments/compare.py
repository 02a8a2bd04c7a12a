"""The paper's comparison on the task suite, with seeds, tuned learning rates and confidence intervals.

    python -m training.experiments.compare [--out docs] [--quick] [options]     (`make results`)

On the shipped backbone (`training.backbone`, never trained on the suite), for each of --seeds
pre-training seeds:
  1. multi-task pre-training on the 62 training tasks of a shared LoRA (rank K*r, the skills' scale),
     Poly (h = 1) and MHR (h = --heads), plus MHR with the other --ablation-heads: the same adapter weights;
  2. learning rates: each few-shot method's adapter learning rate (and routing-logits learning rate for
     routed methods) picked from a small grid by exact match on the validation tasks (their own words),
     with the first pre-training seed and few-shot seed; never on a test word or a held-out task;
  3. few-shot adaptation of every held-out task with LoRA, Poly, MHR, MHR-z and MHR-mu for each of
     --fewshot-seeds seeds, each its own k-subset of a pool of --pool instances; the head ablation adapts
     MHR inventories of every h in --ablation-heads the same way;
  4. zero-shot on the held-out tasks: the backbone alone, the skills' plain average, and the average
     trained --zeroshot-steps more multi-task steps, early-stopped on the validation tasks; the candidate
     that validation picks is the one a bundle serves.
Every score is kept per test instance; differences come with paired bootstrap 95% intervals over
pre-training seeds, tasks and test words (`training.experiments.stats`). Writes results.md (text below
the line `<!-- analysis -->` of an existing one is kept), results.json and routing.png into --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from training import suite
from training.backbone import SHIPPED, shipped_recipe
from training.data import read_jsonl
from training.experiments import report
from training.experiments.runs import FEW_SHOT, ROUTED, Sizes, fewshot_job, pretrain_job, zeroshot_job

COMMAND = "python -m training.experiments.compare"
# The full run's sizes (under 90 minutes on 2 cores); each option's help shows its default in brackets.
DEFAULTS = dict(ablation_heads=[1, 2, 4, 8], ablation_fewshot_seeds=1, seeds=3, fewshot_seeds=3, shots=16, pool=64,
                pretrain_steps=1000, adapt_steps=50, zeroshot_steps=200, lr_grid=[3e-3, 1e-2, 3e-2],
                logits_lr_grid=[0.1, 1.0], tasks=list(suite.HELD_OUT_TASKS),
                validation_tasks=list(suite.VALIDATION_TASKS[:4]), n_train=64, n_test=32, pretrain_eval=8)
QUICK = dict(seeds=2, fewshot_seeds=2, tasks=list(suite.HELD_OUT_TASKS[:4]),
             validation_tasks=list(suite.VALIDATION_TASKS[:2]), pretrain_steps=60, adapt_steps=20,
             zeroshot_steps=20, n_train=16, n_test=8, pool=16, shots=8, lr_grid=[1e-2], logits_lr_grid=[0.3],
             ablation_heads=[1, 4], ablation_fewshot_seeds=1, pretrain_eval=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"Options left out take the full run's sizes {DEFAULTS}, or with --quick "
                                       f"{QUICK}.")
    p.add_argument("--out", type=Path, default=Path("docs"), help="directory for results.md/.json, routing.png")
    p.add_argument("--work", type=Path, default=None, help="directory for bundles and data (default: a temp dir)")
    p.add_argument("--backbone", type=Path, default=SHIPPED, help="backbone directory")
    p.add_argument("--rerender", action="store_true",
                   help="write results.md and results.json again from the runs kept in --out/results.json")
    p.add_argument("--quick", action="store_true", help="a smoke test in minutes (options given explicitly win)")
    p.add_argument("--skills", type=int, default=8, help="K")
    p.add_argument("--heads", type=int, default=4, help="h of MHR")
    p.add_argument("--rank", type=int, default=4, help="r of each skill; the shared LoRA gets rank K*r")
    p.add_argument("--ablation-heads", type=int, nargs="+", default=None, help="h of the head ablation")
    p.add_argument("--ablation-fewshot-seeds", type=int, default=None,
                   help="few-shot seeds of the head ablation's own inventories")
    p.add_argument("--seeds", type=int, default=None, help="pre-training seeds")
    p.add_argument("--fewshot-seeds", type=int, default=None, help="few-shot seeds per pre-training seed")
    p.add_argument("--shots", type=int, default=None, help="k")
    p.add_argument("--pool", type=int, default=None, help="instances per held-out task the shots come from")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps")
    p.add_argument("--adapt-steps", type=int, default=None, help="steps of every few-shot method")
    p.add_argument("--zeroshot-steps", type=int, default=None, help="extra multi-task steps of zero-shot MHR-mu")
    p.add_argument("--lr-grid", type=float, nargs="+", default=None, help="adapter learning rates")
    p.add_argument("--logits-lr-grid", type=float, nargs="+", default=None, help="routing logits")
    p.add_argument("--tasks", nargs="+", default=None, choices=suite.HELD_OUT_TASKS, metavar="TASK",
                   help="held-out tasks")
    p.add_argument("--validation-tasks", nargs="+", default=None, choices=suite.VALIDATION_TASKS, metavar="TASK",
                   help="validation tasks")
    p.add_argument("--n-train", type=int, default=None, help="instances per training task")
    p.add_argument("--n-test", type=int, default=None, help="test (and validation) instances per task")
    p.add_argument("--pretrain-eval", type=int, default=None, help="held-in test instances per training task")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    args = p.parse_args(argv)
    for name, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.pool <= args.shots:
        p.error(f"--pool ({args.pool}) must be larger than --shots ({args.shots}): seeds draw different subsets")
    return args


def inventories(args) -> dict[str, tuple[str, int]]:
    """Inventory name -> (pre-training method, heads): the shared LoRA, Poly, MHR and the ablation's MHRs."""
    found = {"lora": ("lora", 1), "poly": ("poly", 1), "mhr": ("mhr", args.heads)}
    found.update({f"mhr-h{h}": ("mhr", h) for h in args.ablation_heads if h not in (1, args.heads)})
    return found


def grid(args, label: str) -> list[tuple[float, float]]:
    """The (adapter lr, logits lr) pairs tried for a method: MHR-z trains logits only, dense methods none."""
    if label == "MHR-z":
        return [(args.lr_grid[0], g) for g in args.logits_lr_grid]
    if label in ROUTED:
        return [(lr, g) for lr in args.lr_grid for g in args.logits_lr_grid]
    return [(lr, args.logits_lr_grid[0]) for lr in args.lr_grid]


def run_all(pool: ProcessPoolExecutor, function, jobs: list[dict], what: str) -> list[dict]:
    log(f"{what}: {len(jobs)} runs")
    done = []
    for result in pool.map(function, jobs):
        done.append(result)
        if len(done) % 50 == 0:
            log(f"  {len(done)}/{len(jobs)}")
    return done


def pick_rates(grid_runs: list[dict]) -> dict[str, dict]:
    """Per method: the grid point of best mean exact match on the validation tasks (then lowest loss)."""
    chosen = {}
    for label in FEW_SHOT:
        points: dict[tuple, list] = {}
        for r in grid_runs:
            if r["label"] == label:
                points.setdefault((r["lr"], r["logits_lr"]), []).append(r)
        table = [{"lr": lr, "logits_lr": g,
                  "exact_match": sum(sum(r["correct"]) / len(r["correct"]) for r in rs) / len(rs),
                  "loss": sum(r["loss"] for r in rs) / len(rs)} for (lr, g), rs in points.items()]
        best = max(table, key=lambda t: (t["exact_match"], -t["loss"]))
        chosen[label] = {"lr": best["lr"], "logits_lr": best["logits_lr"], "grid": table}
    return chosen


def fewshot_jobs(args, data: dict, sizes: Sizes, work: Path, rates: dict) -> list[dict]:
    """The few-shot runs: every method, seed, few-shot seed and held-out task, then the head ablation."""
    def job(label, bundle, seed, f, task, name):
        return {"label": label, "name": name, "bundle": str(work / f"seed{seed}" / bundle), "task": task,
                "seed": seed, "fewshot_seed": f, "k": args.shots, "pool": data["pool"][task],
                "test": data["test"][task], "sizes": sizes, "stage": "test", **rates[label]}

    jobs = [job(label, FEW_SHOT[label][0], s, f, t, label) for label in FEW_SHOT for s in range(args.seeds)
            for f in range(args.fewshot_seeds) for t in args.tasks]
    jobs += [job("MHR", name, s, f, t, f"MHR h={h}") for name, (_, h) in inventories(args).items()
             if name.startswith("mhr-h") for s in range(args.seeds) for f in range(args.ablation_fewshot_seeds)
             for t in args.tasks]
    return jobs


def load_data(args, work: Path) -> dict:
    paths = suite.write_suite(work / "suite", args.n_train, args.n_test, args.pool, seed=0)
    by_task = {}
    for name in ("heldout-train", "heldout-test", "validation-train", "validation-test", "test"):
        for ex in read_jsonl(paths[name]):
            by_task.setdefault(name, {}).setdefault(ex.task, []).append(ex)
    return {"train": read_jsonl(paths["train"]),
            "held_in_test": [ex for exs in by_task["test"].values() for ex in exs[:args.pretrain_eval]],
            "pool": {**by_task["heldout-train"], **by_task["validation-train"]},
            "test": {**by_task["heldout-test"], **by_task["validation-test"]},
            "validation": [ex for t in args.validation_tasks for ex in by_task["validation-test"][t]]}


def run(args) -> dict:
    work = args.work or Path(tempfile.mkdtemp(prefix="mhr-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    data = load_data(args, work)
    sizes = Sizes(skills=args.skills, rank=args.rank, pretrain_steps=args.pretrain_steps,
                  adapt_steps=dict.fromkeys(FEW_SHOT, args.adapt_steps))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(args.threads,)) as pool:
        pretrained = run_all(pool, pretrain_job, [
            {"name": name, "method": method, "heads": heads, "seed": s, "backbone": str(args.backbone),
             "train": data["train"], "test": data["held_in_test"], "out": str(work / f"seed{s}" / name),
             "sizes": sizes} for s in range(args.seeds) for name, (method, heads) in inventories(args).items()],
            f"pre-training ({len(suite.TRAIN_TASKS)} tasks, {args.pretrain_steps} steps)")
        grid_jobs = [{"label": label, "name": label, "bundle": str(work / "seed0" / FEW_SHOT[label][0]), "task": t,
                      "seed": 0, "fewshot_seed": 0, "k": args.shots, "pool": data["pool"][t], "test": data["test"][t],
                      "sizes": sizes, "stage": "grid", "lr": lr, "logits_lr": g}
                     for label in FEW_SHOT for lr, g in grid(args, label) for t in args.validation_tasks]
        rates = pick_rates(run_all(pool, fewshot_job, grid_jobs, "learning rates on the validation tasks"))
        log("chosen: " + ", ".join(f"{k} lr {v['lr']:g} logits {v['logits_lr']:g}" for k, v in rates.items()))
        fewshot = run_all(pool, fewshot_job, fewshot_jobs(args, data, sizes, work, rates), "few-shot")
        zero = run_all(pool, zeroshot_job, [
            {"seed": s, "bundle": str(work / f"seed{s}" / "mhr"), "train": data["train"],
             "validation": data["validation"], "test": [ex for t in args.tasks for ex in data["test"][t]],
             "tasks": args.tasks, "steps": args.zeroshot_steps, "eval_every": max(1, args.zeroshot_steps // 8),
             "lr": rates["MHR-μ"]["lr"], "sizes": sizes} for s in range(args.seeds)], "zero-shot")
    import mhr
    from training.plot import plot_routing
    args.out.mkdir(parents=True, exist_ok=True)
    plot_routing(mhr.Bundle.load(work / "seed0" / "mhr"), args.out / "routing.png")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return report.summarize(settings, sizes.to_dict(), shipped_recipe(args.backbone), pretrained, rates,
                            fewshot, zero)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def results_json(results: dict) -> str:
    """The results indented, except the runs' per-instance scores: one line for them keeps the file readable."""
    head = json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2, ensure_ascii=False)
    runs = json.dumps(results["runs"], ensure_ascii=False, separators=(",", ":"))
    return f'{head[:-2]},\n  "runs": {runs}\n}}\n'


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    if args.rerender:  # the report again from the runs results.json keeps, with their command and time
        results = report.resummarize(json.loads((args.out / "results.json").read_text()))
    else:
        results = run(args)
        results["command"] = " ".join([COMMAND, *argv])
        results["minutes"] = round((time.monotonic() - start) / 60, 1)
    (args.out / "results.json").write_text(results_json(results))
    page = args.out / "results.md"
    kept = page.read_text().split(report.ANALYSIS, 1)[1] if page.exists() and report.ANALYSIS in page.read_text() \
        else ""
    page.write_text(report.markdown(results) + (f"\n{report.ANALYSIS}{kept}" if kept else ""))
    log(f"wrote {page}, {args.out / 'results.json'}, {args.out / 'routing.png'} ({results['minutes']} min)")


if __name__ == "__main__":
    main()
