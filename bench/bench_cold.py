"""Cold tasks on CPU: a routed task materialized into a free slot by the compiled op and by torch ops, and
bursts of cold tasks materialized together.

    python -m bench.bench_cold [--rounds 5] [--threads 2]

Builds the reference workload and four engines on it: slots of the tasks' rank (8) and slots of rank 16
(the tasks zero-padded), each with the compiled CPU kernels and without them (`cpu_kernel`). Times the
cold task of `bench_engine` (routing weights, then mixing into a slot; all 16 tasks, medians) with the
inventory in cache and with the caches flushed first, the engines taking turns round after round so that
load drifts hit all. Then bursts of 1, 4 and 16 cold tasks (as a step admits them), caches flushed
before each burst: written one by one (`SlotWeights.write`, each mixing reading the inventory) against
together (`write_many`, one pass over the inventory), taking turns. Prints ms per task and the ratios;
never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_engine import EVICT_BYTES, cold_task_ms, engine_for, synchronize
from bench.workload import build

BURSTS = (1, 4, 16)  # cold tasks admitted in one step


def burst_ms(engine, tasks: list[str], together: bool) -> float:
    """ms per task to load `tasks` (routing weights) and write them into slots 2, 3, ..., caches flushed
    first: in one `write_many`, or one `write` each."""
    keys = [engine.tasks.resolve(task) for task in tasks]
    torch.empty(EVICT_BYTES // 4).fill_(1.0)
    synchronize()
    start = time.perf_counter()
    items = [(slot, engine.tasks.load(key)) for slot, key in enumerate(keys, start=2)]
    if together:
        engine.slots.write_many(items)
    else:
        for slot, adapter in items:
            engine.slots.write(slot, adapter)
    synchronize()
    return (time.perf_counter() - start) * 1e3 / len(tasks)


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
        bursts = engine_for(w, len(w.tasks) + 2)
        times: dict[tuple, list[float]] = {}
        for _ in range(args.rounds):
            for (rank, op), engine in engines.items():
                for flushed in (False, True):
                    weights, mix, _ = cold_task_ms(engine, w, evict=flushed)
                    times.setdefault((rank, op, flushed), []).append(weights + mix)
            for n in BURSTS:
                for together in (False, True):
                    times.setdefault(("burst", n, together), []).append(burst_ms(bursts, w.tasks[:n], together))
    ms = {key: statistics.median(values) for key, values in times.items()}
    print(f"\n{'slots':<34}{'caches':<10}{'op ms':>8}{'torch ms':>10}{'op / torch':>12}")
    for rank in (8, 16):
        for flushed in (False, True):
            op, plain = ms[rank, True, flushed], ms[rank, False, flushed]
            print(f"{f'rank {rank} (tasks rank 8)':<34}{'flushed' if flushed else 'warm':<10}{op:>8.3f}{plain:>10.3f}"
                  f"{op / plain:>12.2f}")
    print(f"\n{'cold tasks at once, caches flushed':<36}{'one by one ms':>15}{'together ms':>13}"
          f"{'together / one by one':>23}")
    for n in BURSTS:
        alone, together = ms["burst", n, False], ms["burst", n, True]
        print(f"{f'{n} task(s), per task':<36}{alone:>15.3f}{together:>13.3f}{together / alone:>23.2f}")
    print(f"\nreference workload, float32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} rounds (medians)")


if __name__ == "__main__":
    main()
