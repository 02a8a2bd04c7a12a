"""Prompts that share a per-task prefix (an instruction, few-shot examples): the engine with and without its
prefix cache.

    python -m bench.bench_prefix [--prefix 160] [--question 16] [--rounds 3] [--threads 2]

On the reference workload's backbone and tasks: 4 tasks, each with its own `--prefix`-token prefix, shared by
4 requests that add `--question` tokens of their own; 16 new tokens each. The engine with a prefix cache has
served one earlier request per task (its prefix is cached); the other prefills every prompt whole. Each round
submits the 16 requests together (new questions every round) to both engines in turn; prints the medians of the
time for all tokens and of the mean time to first token, and the cached / uncached ratios. Never asserts.
"""

from __future__ import annotations

import argparse
import random
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

TASKS, PER_TASK, NEW_TOKENS = 4, 4, 16


def engine_for(w: Workload, max_seq_len: int, prefix_cache_mb: float) -> Engine:
    config = ServerConfig(n_slots=TASKS + 3, max_running=TASKS * PER_TASK, max_seq_len=max_seq_len,
                          prefix_cache_mb=prefix_cache_mb)
    return Engine(load_backbone(w), mhr.Bundle.load(w.bundle_dir), config)


def requests(w: Workload, prefixes: list[list[int]], question: int, rng: random.Random, vocab: int) -> list[Request]:
    """`PER_TASK` requests for each of the first `TASKS` tasks: its prefix, then a question of `question` tokens."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return [Request(prefix + [rng.randrange(3, vocab) for _ in range(question)], task, params)
            for task, prefix in zip(w.tasks[:TASKS], prefixes, strict=True) for _ in range(PER_TASK)]


def timed(engine: Engine, batch: list[Request]) -> tuple[float, float, list[list[int]]]:
    """(seconds for every token of `batch`, mean time to first token in ms, the tokens)."""
    start = time.perf_counter()
    results = engine.generate(batch)
    seconds = time.perf_counter() - start
    return seconds, statistics.mean(r.first_token_seconds for r in results) * 1e3, [r.tokens for r in results]


def compare(w: Workload, prefix: int, question: int, rounds: int) -> tuple[dict[str, tuple[float, float]], int]:
    """Median (seconds, mean TTFT ms) per engine over `rounds`, after one warm-up round each, and the prompt
    tokens the cached engine did not prefill in the timed rounds; checks on the way that both engines give the
    same tokens."""
    rng = random.Random(0)
    max_seq_len = prefix + question + NEW_TOKENS
    engines = {"no prefix cache": engine_for(w, max_seq_len, 0), "prefix cache": engine_for(w, max_seq_len, 256)}
    vocab = engines["prefix cache"].model.config.vocab_size
    prefixes = [[rng.randrange(3, vocab) for _ in range(prefix)] for _ in range(TASKS)]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    reused = 0
    for round_ in range(rounds + 1):
        batch = requests(w, prefixes, question, rng, vocab)
        before = engines["prefix cache"].stats().prefix.hit_tokens
        tokens = []
        for name, engine in engines.items():
            seconds, ttft, out = timed(engine, [Request(r.prompt, r.task, r.params) for r in batch])
            tokens.append(out)
            if round_:  # the first round warms both up and fills the prefix cache
                times[name].append((seconds, ttft))
        if round_:
            reused += engines["prefix cache"].stats().prefix.hit_tokens - before
        if tokens[0] != tokens[1]:
            raise RuntimeError("the engines with and without the prefix cache gave different tokens")
    medians = {name: (statistics.median(s for s, _ in t), statistics.median(f for _, f in t))
               for name, t in times.items()}
    return medians, reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", type=int, default=160)
    parser.add_argument("--question", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mhr-bench-") as tmp:
        medians, reused = compare(build(Path(tmp)), args.prefix, args.question, args.rounds)
    print(f"\n{'engine':<20}{'all tokens, s':>15}{'mean TTFT, ms':>16}")
    for name, (seconds, ttft) in medians.items():
        print(f"{name:<20}{seconds:>15.3f}{ttft:>16.1f}")
    (plain_s, plain_ttft), (cached_s, cached_ttft) = medians["no prefix cache"], medians["prefix cache"]
    print(f"{'cached / uncached':<20}{cached_s / plain_s:>15.2f}{cached_ttft / plain_ttft:>16.2f}")
    print(f"\n{TASKS} tasks x {PER_TASK} requests: {args.prefix}-token prefix per task + {args.question}-token "
          f"question, {NEW_TOKENS} new tokens; prompt tokens not prefilled by the cached engine: {reused} of "
          f"{args.rounds * TASKS * PER_TASK * (args.prefix + args.question)}; reference backbone, float32, CPU, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (medians)")


if __name__ == "__main__":
    main()
