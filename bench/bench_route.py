"""Instant routing on a live server: time from `POST /admin/tasks/{task}/route` to the new task's first answer,
and what the routing found is worth, on a bundle and its held-out tasks.

    python -m bench.bench_route --bundle .cache/mhr-demo/bundle --model .cache/mhr-demo/backbone \\
        --shots .cache/mhr-demo/suite/heldout-train.jsonl --test .cache/mhr-demo/suite/heldout-test.jsonl [--k 8]

For each held-out task: a copy of the bundle served by `mhr serve`'s app in this process (uvicorn on loopback),
k examples of the task (the first k of --shots) posted to the route, then one completion of the new task
(the first answer); exact match of greedy answers on the task's --test records under the zero-shot adapter
(before) and the routed task (after). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import torch
import uvicorn

ADMIN_KEY = "bench-admin-key"


def records(path: Path) -> dict[str, list[dict]]:
    by_task = defaultdict(list)
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_task[record["task"]].append(record)
    return by_task


def exact_match(client: httpx.Client, task: str, tests: list[dict]) -> float:
    hits = 0
    for record in tests:
        r = client.post("/v1/completions", json={"model": task, "prompt": record["input"], "max_tokens": 24,
                                                 "temperature": 0})
        hits += r.json()["choices"][0]["text"].strip() == record["target"].strip()
    return hits / len(tests)


def serve(bundle: Path, model: str, threads: int):
    from server.config import ServerConfig
    from server.engine.core import Engine
    from server.main import app_for

    torch.set_num_threads(threads)
    settings = ServerConfig(bundle=str(bundle), model=model, admin_key=ADMIN_KEY)
    server = uvicorn.Server(uvicorn.Config(app_for(settings, Engine.from_config(settings)), host="127.0.0.1",
                                           port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


@contextlib.contextmanager
def served_copy(args, timeout: float = 300) -> Iterator[tuple[Path, httpx.Client]]:
    """A fresh copy of `args.bundle` served by `mhr serve`'s app in this process; yields the copy's path and a
    client of the server."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(shutil.copytree(args.bundle, Path(tmp) / "bundle"))
        server, url = serve(bundle, args.model, args.threads)
        try:
            with httpx.Client(base_url=url, timeout=timeout) as client:
                yield bundle, client
        finally:
            server.should_exit = True


def bench_task(task: str, args, shots: list[dict], tests: list[dict]) -> dict:
    with served_copy(args) as (_, client):
        before = exact_match(client, task, tests)
        examples = [{"input": s["input"], "output": s["target"]} for s in shots[:args.k]]
        started = time.perf_counter()
        r = client.post(f"/admin/tasks/{task}/route", json={"examples": examples},
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        r.raise_for_status()
        client.post("/v1/completions", json={"model": task, "prompt": tests[0]["input"], "max_tokens": 24})
        first_answer = time.perf_counter() - started
        found = r.json()
        after = exact_match(client, task, tests)
    return {"task": task, "route_s": found["seconds"], "first_answer_s": first_answer,
            "evaluations": found["evaluations"], "loss_before": found["loss_before"],
            "loss_after": found["loss_after"], "em_zero_shot": before, "em_routed": after,
            "mixture": found["mixture"]}


def task_arguments(doc: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark of new tasks from k examples: the bundle, its backbone, the tasks' examples
    and test records."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--shots", type=Path, required=True, help="JSONL: the tasks' examples (the first k used)")
    parser.add_argument("--test", type=Path, required=True, help="JSONL: the tasks' test records")
    parser.add_argument("--k", type=int, default=8, help="examples per task (default: 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = task_arguments(__doc__).parse_args(argv)
    shots, tests = records(args.shots), records(args.test)
    rows = [bench_task(task, args, shots[task], tests[task]) for task in sorted(shots) if tests.get(task)]
    print(f"\n{'task':<22}{'route s':>9}{'1st answer s':>14}{'scored':>8}{'loss before':>13}{'after':>8}"
          f"{'EM zero-shot':>14}{'EM routed':>11}  mixture")
    for row in rows:
        mixture = ", ".join(f"{t} {share:.3g}" for t, share in row["mixture"].items())
        print(f"{row['task']:<22}{row['route_s']:>9.2f}{row['first_answer_s']:>14.2f}{row['evaluations']:>8}"
              f"{row['loss_before']:>13.3f}{row['loss_after']:>8.3f}{row['em_zero_shot']:>14.3f}"
              f"{row['em_routed']:>11.3f}  {mixture}")
    for key in ("first_answer_s", "em_zero_shot", "em_routed"):
        print(f"median {key}: {statistics.median(r[key] for r in rows):.3f}")


if __name__ == "__main__":
    main()
