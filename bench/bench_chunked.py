"""A long prompt arriving while requests decode: their longest wait for a token, whole prefill vs. chunks.

    python -m bench.bench_chunked [--long 224] [--chunk 32] [--rounds 3] [--threads 2]

On the reference workload (the same backbone and tasks as `bench_engine`): 8 requests start decoding,
then a prompt of `--long` tokens arrives, and a short one (`SHORT` tokens) right after it. With
`max_prefill_tokens` above the long prompt's length the engine prefills it in one step; with `--chunk` it
takes one chunk a step, and the short prompt starts beside a chunk (docs/engine.md, "Long prompts, in
chunks"). Prints, per setting, the longest step while the long prompt was prefilled (the running requests'
longest wait for their next token) and both prompts' times to their first token, medians over rounds (the
two settings take turns), and the chunked / whole ratios. Never asserts.
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
from server.engine.outputs import TokenEvent
from server.engine.requests import Request, SamplingParams

RUNNING = 8
LONG_NEW_TOKENS = 4
SHORT = 12


def engine_with_budget(w: Workload, max_prefill_tokens: int, long: int) -> Engine:
    """The engine for `RUNNING` of the workload's requests and one prompt of `long` tokens."""
    max_seq_len = max(long + LONG_NEW_TOKENS, max(map(len, w.prompts)) + w.new_tokens)
    config = ServerConfig(n_slots=RUNNING + 4, max_running=RUNNING + 2, max_seq_len=max_seq_len,
                          max_prefill_tokens=max_prefill_tokens, prefix_cache_mb=0)  # each round prefills whole
    return Engine(load_backbone(w), mhr.Bundle.load(w.bundle_dir), config)


def long_prompt_round(engine: Engine, w: Workload, long: list[int]) -> tuple[float, float, float]:
    """(longest step in ms while the long prompt was prefilled, its time to first token in ms, the short
    prompt's time to first token in ms)."""
    params = SamplingParams(max_new_tokens=w.new_tokens, ignore_eos=True)
    answered: set[str] = set()  # requests that have a token (or have ended)

    def on_event(event: TokenEvent) -> None:
        answered.add(event.request_id)

    running = [engine.submit(Request(p, t, params), on_event)
               for p, t in zip(w.prompts[:RUNNING], w.tasks, strict=False)]
    while not answered.issuperset(h.request_id for h in running):  # prompts over the budget start one a step
        engine.step()
    few = SamplingParams(max_new_tokens=LONG_NEW_TOKENS, ignore_eos=True)
    handle = engine.submit(Request(long, w.tasks[RUNNING], few), on_event)
    short = engine.submit(Request(long[-SHORT:], w.tasks[RUNNING + 1], few), on_event)
    start, steps, first = time.perf_counter(), [], {}
    while len(first) < 2:
        step_start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - step_start)
        for h in (handle, short):  # (time to its first token, steps run by then)
            if h.request_id in answered:
                first.setdefault(h.request_id, (time.perf_counter() - start, len(steps)))
    for h in [*running, handle, short]:
        engine.cancel(h.request_id)
    (long_ttft, long_steps), (short_ttft, _) = first[handle.request_id], first[short.request_id]
    return max(steps[:long_steps]) * 1e3, long_ttft * 1e3, short_ttft * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", type=int, default=224, help="tokens of the long prompt")
    parser.add_argument("--chunk", type=int, default=32, help="max_prefill_tokens of the chunked setting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mhr-bench-") as tmp:
        w = build(Path(tmp))
        long = torch.randint(3, 8192, (args.long,), generator=torch.Generator().manual_seed(1)).tolist()
        engines = {"whole prompt in one step": engine_with_budget(w, args.long, args.long),
                   f"chunks of {args.chunk} tokens": engine_with_budget(w, args.chunk, args.long)}
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in engines}
        for _ in range(args.rounds + 1):               # the first round warms up and is dropped
            for name, engine in engines.items():
                results[name].append(long_prompt_round(engine, w, long))
        print(f"\n{'setting':<28}{'longest step, ms':>18}{'long prompt TTFT, ms':>22}{'short prompt TTFT, ms':>23}")
        medians = {}
        for name, rounds in results.items():
            medians[name] = gap, ttft, short = [statistics.median(values) for values in zip(*rounds[1:], strict=True)]
            print(f"{name:<28}{gap:>18.1f}{ttft:>22.1f}{short:>23.1f}")
        whole, chunked = medians.values()
        gap, ttft, short = (c / w for c, w in zip(chunked, whole, strict=True))
        print(f"\nchunked / whole: longest step {gap:.2f}, long prompt TTFT {ttft:.2f}, short prompt TTFT {short:.2f}"
              f"   ({RUNNING} requests decoding, a {args.long}-token prompt then a {SHORT}-token one, "
              f"{args.rounds} rounds, medians, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
