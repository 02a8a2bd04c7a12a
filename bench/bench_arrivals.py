"""Requests arriving while others decode: a step's parts in one forward vs. one forward per part.

    python -m bench.bench_arrivals [--every 4] [--rounds 3] [--threads 2]

On the reference workload (the same backbone, 16 prompts and tasks as `bench_engine`), request i is
submitted before step `i * --every`, so that most steps admit a prompt while others decode. The engine
runs a step as one forward: the running rows' next tokens and the new prompts packed into one input for
every linear, attention part by part (docs/engine.md, "The step"). The baseline is the same engine with
each part of a step (the running rows, each group of new prompts) in a forward of its own, as serving
engines that keep prefill and decode apart do. Prints, per setting, the workload's time, tokens per
second, the median step that admitted a prompt (the running requests' wait for their next token then)
and the mean time to first token, medians over rounds (the settings take turns), and the ratios.
Checks that both give every request the same tokens. Never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mhr
from bench.workload import Workload, build, load_backbone
from server.config import ServerConfig
from server.engine.core import Engine
from server.engine.requests import Request, SamplingParams
from server.model.decoder import Part


class ForwardPerPart(Engine):
    """The baseline: every part of a step in its own forward."""

    def _forward(self, parts: list[Part]) -> list[torch.Tensor]:
        forward = super()._forward
        return [forward([part])[0] for part in parts]


def engine_of(cls: type[Engine], w: Workload) -> Engine:
    config = ServerConfig(n_slots=len(w.tasks) + 2, max_running=len(w.prompts),
                          max_seq_len=max(map(len, w.prompts)) + w.new_tokens, prefix_cache_mb=0)
    return cls(load_backbone(w), mhr.Bundle.load(w.bundle_dir), config)


def arrivals_round(engine: Engine, w: Workload, every: int) -> tuple[float, float, float, list[list[int]]]:
    """(seconds for the workload, median ms of a step that admitted a prompt, mean time to first token in ms,
    each request's tokens)."""
    params = SamplingParams(max_new_tokens=w.new_tokens, ignore_eos=True)
    handles, submitted, first, arrival_steps = [], {}, {}, []

    def on_event(event) -> None:
        first.setdefault(event.request_id, time.perf_counter())

    start, step = time.perf_counter(), 0
    while len(handles) < len(w.prompts) or engine.has_work:
        admitting = step % every == 0 and len(handles) < len(w.prompts)
        if admitting:
            i = len(handles)
            handles.append(engine.submit(Request(w.prompts[i], w.tasks[i], params), on_event))
            submitted[handles[-1].request_id] = time.perf_counter()
        step_start = time.perf_counter()
        engine.step()
        if admitting:
            arrival_steps.append(time.perf_counter() - step_start)
        step += 1
    total = time.perf_counter() - start
    ttft = statistics.mean(first[r] - submitted[r] for r in submitted)
    return total, statistics.median(arrival_steps) * 1e3, ttft * 1e3, [h.result().tokens for h in handles]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=4, help="steps between two arrivals")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", default="reference", help="backbone shape of bench/workload.py")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mhr-bench-") as tmp:
        w = build(Path(tmp), shape=args.shape)
        engines = {"one forward a step": engine_of(Engine, w), "one forward per part": engine_of(ForwardPerPart, w)}
        results: dict[str, list[tuple]] = {name: [] for name in engines}
        for _ in range(args.rounds + 1):               # the first round warms up and is dropped
            for name, engine in engines.items():
                results[name].append(arrivals_round(engine, w, args.every))
        tokens = len(w.prompts) * w.new_tokens
        print(f"\n{'setting':<24}{'time, s':>9}{'tok/s':>9}{'step admitting, ms':>20}{'mean TTFT, ms':>15}")
        medians = {}
        for name, rounds in results.items():
            total, step, ttft = (statistics.median(r[i] for r in rounds[1:]) for i in range(3))
            medians[name] = total, step, ttft
            print(f"{name:<24}{total:>9.2f}{tokens / total:>9.1f}{step:>20.1f}{ttft:>15.1f}")
        (total, step, ttft), (base_total, base_step, base_ttft) = medians.values()
        same = all(r[3] == results["one forward a step"][0][3] for rounds in results.values() for r in rounds)
        print(f"\none forward a step / per part: time {total / base_total:.2f}, step admitting a prompt "
              f"{step / base_step:.2f}, TTFT {ttft / base_ttft:.2f}; same tokens: {'yes' if same else 'NO'}   "
              f"({len(w.prompts)} requests, one every {args.every} steps, {w.new_tokens} tokens each, "
              f"{args.rounds} rounds, medians, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
