"""Cold tasks on CPU: a routed task materialized into a free slot by the compiled op and by torch ops.

    python -m bench.bench_cold [--rounds 5] [--threads 2]

Builds the REFERENCE.md workload and four engines on it: slots of the tasks' rank (8) and slots of rank 16
(the tasks zero-padded), each with the compiled CPU kernels and without them (`cpu_kernel`). Times the
cold task of `bench_engine` (routing weights, then mixing into a slot; all 16 tasks, medians) with the
inventory in cache and with the caches flushed first, the engines taking turns round after round so that
load drifts hit all. Prints ms and the op / torch ratios; never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench.bench_engine import cold_task_ms, engine_for
from bench.workload import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mhr-bench-") as tmp:
        w = build(Path(tmp))
        engines = {(rank, op): engine_for(w, 4, max_rank=rank, cpu_kernel=op)
                   for rank in (8, 16) for op in (True, False)}
        times: dict[tuple, list[float]] = {}
        for _ in range(args.rounds):
            for (rank, op), engine in engines.items():
                for flushed in (False, True):
                    weights, mix, _ = cold_task_ms(engine, w, evict=flushed)
                    times.setdefault((rank, op, flushed), []).append(weights + mix)
    ms = {key: statistics.median(values) for key, values in times.items()}
    print(f"\n{'slots':<34}{'caches':<10}{'op ms':>8}{'torch ms':>10}{'op / torch':>12}")
    for rank in (8, 16):
        for flushed in (False, True):
            op, plain = ms[rank, True, flushed], ms[rank, False, flushed]
            print(f"{f'rank {rank} (tasks rank 8)':<34}{'flushed' if flushed else 'warm':<10}{op:>8.3f}{plain:>10.3f}"
                  f"{op / plain:>12.2f}")
    print(f"\nreference workload, float32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds (medians)")


if __name__ == "__main__":
    main()
