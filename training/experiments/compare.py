"""The paper's comparison on the compositional suite: multi-task pre-training, few-shot and zero-shot.

    python -m training.experiments.compare [--out docs] [--backbone DIR] [options]

On a pre-trained backbone (default: the demo backbone of `training.demo`, built or reused from its cache):
  1. multi-task pre-training of a shared LoRA (rank K*r), Poly (K skills, h = 1) and MHR (K skills, h heads)
     on the suite's training tasks: the three inventories hold the same number of adapter weights;
  2. few-shot adaptation of every held-out task with LoRA (the shared LoRA, fine-tuned), Poly, MHR, MHR-z and
     MHR-mu, for each k in --shots and each of --seeds seeds (exact match median and range over seeds);
  3. zero-shot on the held-out tasks: the backbone alone, the shared LoRA, the plain MHR-mu average, and
     MHR-mu after --zeroshot-steps extra multi-task steps;
  4. trainable parameters per method, and the routing heatmap of the MHR bundle.
Writes results.md, results.json and routing.png into --out. In an existing results.md, text below the line
`<!-- analysis -->` is kept.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import mhr
from training import suite
from training.adapt import prepare
from training.config import TrainConfig
from training.data import Example, TaskBatches, read_jsonl
from training.demo import TARGET_MODULES
from training.evaluate import evaluate_bundle, evaluate_examples
from training.loop import train
from training.model import load_backbone, model_for_bundle, seed_everything
from training.pretrain import pretrain
from training.zeroshot import zeroshot

# (label, bundle, adaptation method); "lora" fine-tunes the shared LoRA (the average of its one skill)
FEW_SHOT = (("LoRA", "lora", "mhr-mu"), ("Poly", "poly", "poly"), ("MHR", "mhr", "mhr"),
            ("MHR-z", "mhr", "mhr-z"), ("MHR-μ", "mhr", "mhr-mu"))
ANALYSIS = "<!-- analysis -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs"), help="directory for results.md/.json, routing.png")
    p.add_argument("--work", type=Path, default=None, help="directory for bundles and data (default: a temp dir)")
    p.add_argument("--backbone", type=Path, default=None,
                   help="pre-trained backbone directory (default: the demo backbone, built if not cached)")
    p.add_argument("--skills", type=int, default=8, help="K")
    p.add_argument("--heads", type=int, default=4, help="h of MHR")
    p.add_argument("--rank", type=int, default=4, help="r of each skill; the shared LoRA gets rank K*r")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--adapt-steps", type=int, default=40)
    p.add_argument("--zeroshot-steps", type=int, default=100)
    p.add_argument("--shots", type=int, nargs="+", default=[8, 32], help="few-shot sizes k")
    p.add_argument("--seeds", type=int, default=3, help="seeds per (task, method, k)")
    p.add_argument("--tasks", nargs="+", default=list(suite.HELD_OUT_TASKS), choices=suite.HELD_OUT_TASKS,
                   metavar="TASK", help="held-out tasks to adapt")
    p.add_argument("--prompts", choices=suite.PROMPT_STYLES, default="named",
                   help="suite prompts: naming the two skills, or the same for every task (routing must carry it)")
    p.add_argument("--n-train", type=int, default=64, help="instances per training task")
    p.add_argument("--n-test", type=int, default=16, help="test instances per task")
    p.add_argument("--lr", type=float, default=1e-2, help="adapter learning rate")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--jobs", type=int, default=2, help="processes running the few-shot runs")
    return p.parse_args(argv)


def config(args, method: str, steps: int, seed: int = 0, **changes) -> TrainConfig:
    """The TrainConfig of one run; `changes` override fields (pre-training: batch 16, the LoRA's rank)."""
    fields = dict(method=method, skills=args.skills, heads=args.heads, rank=args.rank, alpha=8.0,
                  target_modules=list(TARGET_MODULES), steps=steps, batch_size=8, lr=args.lr, logits_lr=0.1,
                  warmup_steps=min(20, steps // 10), seed=seed, device="cpu", max_length=64)
    return TrainConfig(**{**fields, **changes})


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapt_score(bundle: mhr.Bundle, method: str, task: str, shots: list[Example], test: list[Example],
                cfg, eval_model, tokenizer) -> tuple[dict, int]:
    """Adapt `task` on `shots` in memory (the bundle is not changed); its metrics on `test`, and the
    trainable parameters of the run."""
    seed_everything(cfg.seed)
    model, tok = model_for_bundle(bundle, n_tasks=1, device="cpu")
    prepare(model, method, bundle.config)
    n_params = trainable(model)
    train(model, TaskBatches(tok, shots, [task], cfg.batch_size, cfg.max_length, cfg.seed), cfg, progress=False)
    if method == "mhr-z":
        logits = {n: layer.router.logits[0].detach() for n, layer in mhr.mhr_layers(model).items()}
        lora = bundle.inventory().materialize_logits(logits)
    elif method in ("mhr", "poly"):
        logits = {n: layer.router.logits[0].detach() for n, layer in mhr.mhr_layers(model).items()}
        lora = mhr.SkillInventory.from_model(model).materialize_logits(logits)
    else:
        lora = mhr.dense_lora(model)
    mhr.load_lora(eval_model, lora)
    return evaluate_examples(eval_model, tokenizer, test, max_new_tokens=16, batch_size=32), n_params


_EVAL_MODELS: dict[str, tuple] = {}  # per worker process: bundle path -> (evaluation model, tokenizer)


def few_shot_job(job: tuple) -> dict:
    """One adaptation run (in a worker process): seed s takes a different k-subset of the task's shots."""
    label, bundle_path, method, k, seed, task, pool, test, cfg = job
    bundle = mhr.Bundle.load(bundle_path)
    if bundle_path not in _EVAL_MODELS:
        _EVAL_MODELS[bundle_path] = model_for_bundle(bundle, n_tasks=0)
    eval_model, tokenizer = _EVAL_MODELS[bundle_path]
    shots = [pool[(seed * k + i) % len(pool)] for i in range(k)]
    metrics, n_params = adapt_score(bundle, method, task, shots, test, cfg, eval_model, tokenizer)
    return {"label": label, "k": k, "seed": seed, "task": task, "metrics": metrics, "params": n_params}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def run(args) -> dict:
    work = args.work or Path(tempfile.mkdtemp(prefix="mhr-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    backbone = args.backbone
    if backbone is None:
        from training.demo import build
        backbone = build(progress=False, log=lambda m: print(m, flush=True)).backbone
    paths = suite.write_suite(work / "suite", args.n_train, args.n_test, max(args.shots), seed=0, style=args.prompts)
    train_data, test_data = read_jsonl(paths["train"]), read_jsonl(paths["test"])
    held_shots, held_test = read_jsonl(paths["heldout-train"]), read_jsonl(paths["heldout-test"])
    held_test = [ex for ex in held_test if ex.task in args.tasks]
    results: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "backbone": str(backbone), "pretrain": {}, "few_shot": {}, "zero_shot": {}, "params": {}}
    results["settings"]["backbone"] = str(backbone)

    log(f"multi-task pre-training on {len(suite.TRAIN_TASKS)} tasks, {args.pretrain_steps} steps each")
    bundles = {}
    for method in ("lora", "poly", "mhr"):
        changes = {"rank": args.rank * args.skills} if method == "lora" else {}
        cfg = config(args, method, args.pretrain_steps, batch_size=16, **changes)
        bundles[method], result = pretrain(str(backbone), train_data, cfg, work / method, progress=False)
        report = evaluate_bundle(work / method, test_data, max_new_tokens=16, batch_size=64)
        n_tasks = len(suite.TRAIN_TASKS)
        inventory = sum(a.numel() + b.numel() for a, b in zip(bundles[method].lora_A.values(),
                                                               bundles[method].lora_B.values(), strict=True))
        routing = sum(t.numel() for t in bundles[method].routing.values()) if method != "lora" else 0
        results["pretrain"][method] = {**report["average"], "final_loss": result.final_loss,
                                       "inventory_params": inventory, "routing_params": routing,
                                       "routing_params_per_task": routing // n_tasks}
        log(f"  {method}: exact match {report['average']['exact_match']:.3f}, loss {report['average']['loss']:.3f}")

    log("zero-shot on held-out tasks")
    eval_model, tokenizer = load_backbone(str(backbone))
    results["zero_shot"]["backbone alone"] = evaluate_examples(eval_model, tokenizer, held_test, max_new_tokens=16,
                                                               batch_size=32)
    results["zero_shot"]["shared LoRA"] = evaluate_bundle(work / "lora", held_test, zero_shot=True,
                                                          max_new_tokens=16, batch_size=64)["average"]
    results["zero_shot"]["MHR-μ, plain average"] = evaluate_bundle(work / "mhr", held_test, zero_shot=True,
                                                                   max_new_tokens=16, batch_size=64)["average"]
    shutil.copytree(work / "mhr", work / "mhr-zs", dirs_exist_ok=True)
    zeroshot(work / "mhr-zs", train_data, config(args, "mhr-mu", args.zeroshot_steps), progress=False)
    label = f"MHR-μ + {args.zeroshot_steps} multi-task steps"
    results["zero_shot"][label] = evaluate_bundle(work / "mhr-zs", held_test, zero_shot=True, max_new_tokens=16,
                                                  batch_size=64)["average"]
    for name, scores in results["zero_shot"].items():
        log(f"  {name}: exact match {scores['exact_match']:.3f}")

    log(f"few-shot: {len(args.tasks)} tasks x {len(FEW_SHOT)} methods x k in {args.shots} x {args.seeds} seeds"
        f" ({args.jobs} processes)")
    jobs = [(label, str(work / source), method, k, seed, task, [ex for ex in held_shots if ex.task == task],
             [ex for ex in held_test if ex.task == task], config(args, method, args.adapt_steps, seed=seed))
            for label, source, method in FEW_SHOT for k in args.shots for seed in range(args.seeds)
            for task in args.tasks]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(args.threads or 1,)) as pool:
        done = []
        for d in pool.map(few_shot_job, jobs):
            done.append(d)
            if len(done) % 20 == 0:
                log(f"  {len(done)}/{len(jobs)} runs done")
    for label, _, _ in FEW_SHOT:
        for k in args.shots:
            per_seed = []
            for seed in range(args.seeds):
                runs = [d for d in done if d["label"] == label and d["k"] == k and d["seed"] == seed]
                per_seed.append({m: statistics.mean(r["metrics"][m] for r in runs) for m in ("exact_match", "loss")})
                results["params"][label] = runs[0]["params"]
            results["few_shot"].setdefault(label, {})[k] = {m: spread([s[m] for s in per_seed])
                                                            for m in ("exact_match", "loss")}
            r = results["few_shot"][label][k]["exact_match"]
            log(f"  {label:6s} k={k:<3d} exact match median {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")

    from training.plot import plot_routing
    args.out.mkdir(parents=True, exist_ok=True)
    plot_routing(mhr.Bundle.load(work / "mhr"), args.out / "routing.png")
    return results


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def markdown(results: dict, command: str, seconds: float) -> str:
    s = results["settings"]
    lines = ["# Results: the paper's comparison on the compositional suite", "",
             f"Made by `{command}` in {seconds / 60:.0f} minutes "
             f"(torch threads: {torch.get_num_threads()}, fp32, CPU).", "",
             "## Settings", "",
             f"- Backbone: `{results['backbone']}` (pre-trained on the suite's training tasks, "
             "see `training/demo.py`).",
             f"- Suite seed 0: {len(suite.TRAIN_TASKS)} training tasks x {s['n_train']} instances; held-out tasks "
             f"{', '.join(s['tasks'])}; {s['n_test']} test instances per task on words never trained on; prompts "
             + ("name the two skills (\"reverse then upper: kabadu\")." if s.get("prompts", "named") == "named"
                else "the same for every task (\"word: kabadu\"): only the adapter says which task."),
             f"- Inventories: K = {s['skills']} skills of rank {s['rank']} on all seven linear layers per block; "
             f"MHR h = {s['heads']}, Poly h = 1, shared LoRA rank {s['skills'] * s['rank']} (same adapter weights). "
             f"Pre-training {s['pretrain_steps']} steps of 16, lr {s['lr']} (adapters), 0.1 (logits).",
             f"- Few-shot: k in {s['shots']}, {s['seeds']} seeds (each a different k-subset and init), "
             f"{s['adapt_steps']} steps of 8. Exact match averaged over tasks per seed; median [min, max] over seeds.",
             f"- Zero-shot MHR-μ: {s['zeroshot_steps']} extra multi-task steps of the skills' average.",
             "- Greedy decoding, at most 16 new tokens; loss = cross-entropy per target token.", "",
             "## Multi-task pre-training (training tasks, held-in test words)", "",
             "| method | exact match | loss | adapter weights | routing per task |",
             "| --- | ---: | ---: | ---: | ---: |"]
    names = {"lora": "shared LoRA", "poly": "Poly", "mhr": "MHR"}
    for m, r in results["pretrain"].items():
        lines.append(f"| {names[m]} | {r['exact_match']:.3f} | {r['loss']:.3f} | {r['inventory_params']:,} | "
                     f"{r['routing_params_per_task']:,} |")
    shots = sorted({k for v in results["few_shot"].values() for k in v})
    lines += ["", "## Few-shot adaptation of the held-out tasks", "",
              "Exact match, median [min, max] over seeds; loss median.", "",
              "| method | trainable params | " + " | ".join(f"k={k} exact match | k={k} loss" for k in shots) + " |",
              "| --- | ---: | " + " | ".join("---: | ---:" for _ in shots) + " |"]
    for label, by_k in results["few_shot"].items():
        cells = []
        for k in shots:
            em, loss = by_k[k]["exact_match"], by_k[k]["loss"]
            cells += [f"{em['median']:.3f} [{em['min']:.3f}, {em['max']:.3f}]", f"{loss['median']:.3f}"]
        lines.append(f"| {label} | {results['params'][label]:,} | " + " | ".join(cells) + " |")
    lines += ["", "## Zero-shot on the held-out tasks", "", "| adapter | exact match | loss |", "| --- | ---: | ---: |"]
    for name, r in results["zero_shot"].items():
        lines.append(f"| {name} | {r['exact_match']:.3f} | {r['loss']:.3f} |")
    lines += ["", "## Routing", "", "![routing of the MHR bundle](routing.png)", "",
              "Per head: tasks x skills, routing weights averaged over layers; right: task similarity.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    results = run(args)
    seconds = time.monotonic() - start
    command = "python -m training.experiments.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    kept = ""
    old = args.out / "results.md"
    if old.exists() and ANALYSIS in old.read_text():
        kept = ANALYSIS + old.read_text().split(ANALYSIS, 1)[1]
    old.write_text(markdown(results, command.strip(), seconds) + ("\n" + kept if kept else ""))
    log(f"wrote {old}, {args.out / 'results.json'}, {args.out / 'routing.png'} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
