"""Benchmark the vLLM engine against the torch engine and against raw vLLM, side by side in one run.

    python -m bench.bench_vllm [--shape reference|small] [--repeats 3] [--threads 2] [--cold 8]

Needs vLLM (the `.venv-vllm` environment). On the reference workload (16 prompts, 16 routed tasks, 64
greedy tokens each, EOS ignored, fp32) it prints generated tokens/s and median time to first token of:
the vLLM engine (adapters materialized by mhr, served as LoRA directories), raw vLLM on the same AsyncLLM
with the same adapters prepared on disk beforehand (target: engine >= 0.95x raw), and the torch engine.
Then the cost of a cold task: a never-seen task through the vLLM engine (materialize + write the PEFT
directory + vLLM load + prefill of a 1-token request) vs. raw vLLM given a prepared directory it has never
seen, vs. an adapter vLLM already holds. Never asserts: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import mhr
from bench.workload import Workload, build, load_backbone
from server.config import ServerConfig
from server.engine.core import Engine
from server.engine.requests import Request, SamplingParams

RAW_ID_BASE = 100_000  # raw vLLM's LoRA ids, far from the engine's own


def vllm_engine_for(w: Workload, n_cold: int):
    from server.vllm_backend.engine import VLLMEngine

    n = len(w.tasks)
    config = ServerConfig(engine="vllm", bundle=str(w.bundle_dir), max_rank=8, max_running=n,
                          max_seq_len=max(map(len, w.prompts)) + w.new_tokens, vllm_max_loras=n,
                          vllm_max_cpu_loras=2 * n + 2 * n_cold + 2)
    # Prefix caching off: repeated prompts would skip their prefill (a pitfall of measuring vLLM). The workload's
    # backbone has no tokenizer: tokens only, like the torch engine here.
    return VLLMEngine(mhr.Bundle.load(w.bundle_dir), config, tokenizer=None,
                      engine_args=dict(kv_cache_memory_bytes=512 << 20, enable_prefix_caching=False,
                                       skip_tokenizer_init=True))


def torch_engine_for(w: Workload, **settings) -> Engine:
    """The torch engine on the workload; `settings` are more `ServerConfig` fields (e.g. compile=True)."""
    config = ServerConfig(n_slots=len(w.tasks) + 2, max_running=len(w.prompts), max_rank=8,
                          max_seq_len=max(map(len, w.prompts)) + w.new_tokens, max_prefill_tokens=4096, **settings)
    return Engine(load_backbone(w), mhr.Bundle.load(w.bundle_dir), config)


def engine_run(engine, w: Workload, ttft: list[float]) -> Callable[[], None]:
    params = SamplingParams(max_new_tokens=w.new_tokens, ignore_eos=True)

    def run():
        results = engine.generate([Request(p, t, params) for p, t in zip(w.prompts, w.tasks, strict=True)])
        ttft.append(statistics.median(r.first_token_seconds for r in results))
    return run


def prepared_dirs(w: Workload, out: Path, names: list[str], bundle: mhr.Bundle | None = None) -> list[Path]:
    """Each task's materialized LoRA written once as a PEFT directory (what raw vLLM users prepare)."""
    bundle = bundle or mhr.Bundle.load(w.bundle_dir)
    return [mhr.export_peft(bundle.task_lora(t), out / t, base_model_name_or_path=str(w.model_dir)) for t in names]


def raw_vllm_run(engine, w: Workload, dirs: list[Path], ttft: list[float], max_tokens: int | None = None,
                 id_base: int = RAW_ID_BASE) -> Callable[[], None]:
    """All prompts at once through the engine's AsyncLLM, each with its prepared LoRA directory."""
    from vllm import SamplingParams as VLLMParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    params = VLLMParams(max_tokens=max_tokens or w.new_tokens, temperature=0, ignore_eos=True, detokenize=False)
    counter = iter(range(10**9))

    async def one(i: int, prompt: list[int], path: Path) -> float:
        start = time.monotonic()
        lora = LoRARequest(f"raw-{id_base + i}", id_base + i, str(path))
        first = None
        async for _ in engine.llm.generate(TokensPrompt(prompt_token_ids=prompt), params, f"raw-{next(counter)}",
                                           lora_request=lora):
            first = first or time.monotonic() - start
        return first

    async def all_prompts() -> list[float]:
        return await asyncio.gather(*(one(i, p, d) for i, (p, d) in enumerate(zip(w.prompts, dirs, strict=True))))

    def run():
        ttft.append(statistics.median(engine._call(all_prompts(), timeout=600)))
    return run


def median_seconds(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Each run once to warm up, then `repeats` rounds with the runs interleaved (load drifts hit all)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cold_costs(engine, w: Workload, out: Path, n: int) -> dict[str, float]:
    """Median ms of a 1-token request on: a task new to the engine, a prepared dir new to raw vLLM, a warm
    adapter; plus the engine's materialize+write share and raw vLLM's add_lora of a prepared dir."""
    from vllm.lora.request import LoRARequest

    bundle = engine.tasks.bundle
    g = torch.Generator().manual_seed(123)
    names = [f"cold{i}" for i in range(n)]
    for name in names:
        logits = {m: torch.randn(bundle.config.n_heads, bundle.config.n_skills, generator=g) * 2
                  for m in bundle.modules}
        engine.put_task(name, logits=logits)
    dirs = prepared_dirs(w, out, names, bundle)
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    cold, warm, write, raw_cold, add = [], [], [], [], []
    for i, name in enumerate(names):
        before = engine.adapters.stats.load_seconds
        start = time.perf_counter()
        engine.generate([Request(w.prompts[0], name, one)])
        cold.append(time.perf_counter() - start)
        write.append(engine.adapters.stats.load_seconds - before)
        start = time.perf_counter()
        engine.generate([Request(w.prompts[0], name, one)])
        warm.append(time.perf_counter() - start)
        ttft: list[float] = []
        start = time.perf_counter()
        raw_vllm_run(engine, Workload(w.model_dir, w.bundle_dir, [w.prompts[0]], [name], 1), [dirs[i]], ttft,
                     max_tokens=1, id_base=2 * RAW_ID_BASE + i)()
        raw_cold.append(time.perf_counter() - start)
        request = LoRARequest(f"add-{i}", 3 * RAW_ID_BASE + i, str(dirs[i]))
        start = time.perf_counter()
        engine._call(engine.llm.add_lora(request))
        add.append(time.perf_counter() - start)
        engine._call(engine.llm.remove_lora(request.lora_int_id))
    ms = {k: statistics.median(v) * 1e3 for k, v in
          dict(cold=cold, write=write, warm=warm, raw_cold=raw_cold, add=add).items()}
    return ms


def report(seconds: dict[str, float], ttft: dict[str, list[float]], tokens: int, cold: dict[str, float],
           args) -> None:
    print(f"\nworkload: shape {args.shape}, {tokens} generated tokens per run, fp32, torch threads "
          f"{args.threads}, medians of {args.repeats}")
    print("\n| system | tok/s | TTFT median ms | vs. vLLM engine |\n| --- | ---: | ---: | ---: |")
    for name, s in seconds.items():
        print(f"| {name} | {tokens / s:.0f} | {statistics.median(ttft[name][1:] or ttft[name]) * 1e3:.1f} | "
              f"{seconds['vLLM engine'] / s:.2f}x |")
    ratio = seconds["raw vLLM, prepared dirs"] / seconds["vLLM engine"]
    print(f"\nvLLM engine / raw vLLM (prepared dirs): {ratio:.2f}x tokens/s (target >= 0.95)")
    torch_vs_vllm = seconds["raw vLLM, prepared dirs"] / seconds["torch engine"]
    print(f"torch engine / raw vLLM multi-LoRA, side by side: {torch_vs_vllm:.2f}x tokens/s (target >= 1.2)")
    print("\n| cold task, 1-token request | ms |\n| --- | ---: |")
    print(f"| vLLM engine, task never used (materialize + PEFT dir + vLLM load + prefill) | {cold['cold']:.1f} |")
    print(f"| of which materialize + write the PEFT dir | {cold['write']:.1f} |")
    print(f"| raw vLLM, prepared dir never seen (vLLM load + prefill) | {cold['raw_cold']:.1f} |")
    print(f"| vLLM engine, same task again (warm adapter) | {cold['warm']:.1f} |")
    print(f"| raw vLLM `add_lora` of a prepared dir alone | {cold['add']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["reference", "small"], default="reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cold", type=int, default=8, help="cold tasks measured")
    args = parser.parse_args()
    # vLLM's engine core drops to 1 torch thread unless OMP_NUM_THREADS says otherwise: same threads for all
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        w = build(Path(tmp), shape=args.shape)
        engine = vllm_engine_for(w, args.cold)
        try:
            torch.set_num_threads(args.threads)  # after vLLM started: it sets the thread count of its process
            dirs = prepared_dirs(w, Path(tmp) / "prepared", w.tasks)
            reference = torch_engine_for(w)
            ttft: dict[str, list[float]] = {"vLLM engine": [], "raw vLLM, prepared dirs": [], "torch engine": []}
            seconds = median_seconds({
                "vLLM engine": engine_run(engine, w, ttft["vLLM engine"]),
                "raw vLLM, prepared dirs": raw_vllm_run(engine, w, dirs, ttft["raw vLLM, prepared dirs"]),
                "torch engine": engine_run(reference, w, ttft["torch engine"]),
            }, args.repeats)
            del reference
            cold = cold_costs(engine, w, Path(tmp) / "cold", args.cold)
        finally:
            engine.close()
    report(seconds, ttft, len(w.prompts) * w.new_tokens, cold, args)


if __name__ == "__main__":
    main()
