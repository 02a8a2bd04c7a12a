"""A new task from k examples on a live server: the adaptation job and the instant route, side by side.

    python -m bench.bench_adapt --bundle .cache/mhr-demo/bundle --model .cache/mhr-demo/backbone \\
        --shots .cache/mhr-demo/suite/heldout-train.jsonl --test .cache/mhr-demo/suite/heldout-test.jsonl \\
        [--k 8] [--steps 100] [--tasks 4] [--latency-seconds 20]

For each of the first --tasks held-out tasks, on a fresh copy of the bundle served by `mhr serve`'s app in this
process (uvicorn on loopback):
- the job: `POST /admin/tasks/{task}/adapt` (MHR-z, --steps steps, the first k examples of --shots), polled
  until done, then one completion of the new task: seconds from the POST to that first answer;
- the route: `POST /admin/tasks/{task}-route/route` with the same examples, then one completion;
- offline: `mhr adapt` (`training.adapt.adapt`) on another copy with the same examples and settings: the largest
  difference between its routing logits and the job's;
- exact match of greedy answers on the task's --test records: zero-shot (before), job, route.
Then latency of a steady stream of requests (open loop, --rate a second, 16 tokens each, rotating over the
bundle's tasks) for --latency-seconds, without a job and while a job trains, on `python -m server` in a process
of its own (as deployed): p50 and p99, and their ratio.
Prints tables; asserts nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from bench.bench_http import percentile
from bench.bench_route import ADMIN_KEY, exact_match, records, served_copy, task_arguments

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def run_job(client: httpx.Client, task: str, examples: list[dict], steps: int, seed: int = 0) -> dict:
    r = client.post(f"/admin/tasks/{task}/adapt", json={"examples": examples, "steps": steps, "seed": seed},
                    headers=ADMIN)
    r.raise_for_status()
    job = r.json()
    while job["state"] not in ("done", "failed", "cancelled"):
        time.sleep(0.02)
        job = client.get(f"/admin/jobs/{job['id']}", headers=ADMIN).json()
    if job["state"] != "done":
        raise RuntimeError(f"job {job['id']} {job['state']}: {job['error']}")
    return job


def first_answer(client: httpx.Client, task: str, prompt: str) -> None:
    client.post("/v1/completions", json={"model": task, "prompt": prompt, "max_tokens": 24, "temperature": 0})


def offline_gap(bundle: Path, served_bundle: Path, task: str, examples: list[dict], steps: int, seed: int,
                max_length: int) -> float:
    """The largest |logit| difference between `mhr adapt` on a copy of `bundle` and the job's task."""
    import mhr
    from training.adapt import adapt
    from training.config import TrainConfig
    from training.data import Example

    config = TrainConfig(method="mhr-z", steps=steps, seed=seed, device="cpu", max_length=max_length)
    adapt(bundle, [Example(task, e["input"], e["output"]) for e in examples], task, config, progress=False)
    offline, served = mhr.Bundle.load(bundle).routing_logits(task), mhr.Bundle.load(served_bundle).routing_logits(task)
    return max(float((offline[m] - served[m]).abs().max()) for m in offline)


def bench_task(task: str, args, shots: list[dict], tests: list[dict]) -> dict:
    examples = [{"input": s["input"], "output": s["target"]} for s in shots[:args.k]]
    with served_copy(args, timeout=600) as (bundle, client):
        before = exact_match(client, task, tests)
        started = time.perf_counter()
        job = run_job(client, task, examples, args.steps)
        first_answer(client, task, tests[0]["input"])
        job_s = time.perf_counter() - started
        em_job = exact_match(client, task, tests)
        started = time.perf_counter()
        r = client.post(f"/admin/tasks/{task}-route/route", json={"examples": examples}, headers=ADMIN)
        r.raise_for_status()
        first_answer(client, f"{task}-route", tests[0]["input"])
        route_s = time.perf_counter() - started
        em_route = exact_match(client, f"{task}-route", tests)
        with tempfile.TemporaryDirectory() as tmp:
            offline = Path(shutil.copytree(args.bundle, Path(tmp) / "offline"))
            gap = offline_gap(offline, bundle, task, examples, args.steps, 0, args.max_seq_len)
    return {"task": task, "job_s": job_s, "job_steps_per_s": job["step"] / (job["finished"] - job["started"]),
            "route_s": route_s, "em_zero_shot": before, "em_job": em_job, "em_route": em_route,
            "offline_gap": gap}


def stream_latencies(client: httpx.Client, tasks: list[str], prompt: str, seconds: float, rate: float) -> list[float]:
    """Open-loop arrivals at `rate` a second for `seconds`: each request's latency (16 greedy tokens at most)."""
    latencies, threads = [], []

    def one(task: str) -> None:
        began = time.perf_counter()
        client.post("/v1/completions", json={"model": task, "prompt": prompt, "max_tokens": 16, "temperature": 0})
        latencies.append(time.perf_counter() - began)

    started = time.perf_counter()
    for n in range(int(seconds * rate)):
        time.sleep(max(0.0, started + n / rate - time.perf_counter()))
        threads.append(threading.Thread(target=one, args=(tasks[n % len(tasks)],)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return latencies


@contextlib.contextmanager
def server_process(bundle: Path, model: str, threads: int, log: Path) -> Iterator[str]:
    """`python -m server` on `bundle` (admin key ADMIN_KEY) in a process of its own, as it is deployed: the
    clients' threads do not share its interpreter. Yields its URL once ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "server", "--bundle", str(bundle), "--model", model,
                                    "--admin-key", ADMIN_KEY, "--port", str(port)], stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def bench_latency(args, tasks: list[str], prompt: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(shutil.copytree(args.bundle, Path(tmp) / "bundle"))
        with server_process(bundle, args.model, args.threads, Path(tmp) / "server.log") as url, \
                httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
            stream_latencies(client, tasks, prompt, 2, args.rate)  # warm-up
            alone = stream_latencies(client, tasks, prompt, args.latency_seconds, args.rate)
            r = client.post("/admin/tasks/bench-job/adapt", headers=ADMIN,
                            json={"examples": [{"input": prompt, "output": "x"}] * 8, "steps": 100_000})
            r.raise_for_status()
            job_id = r.json()["id"]
            beside = stream_latencies(client, tasks, prompt, args.latency_seconds, args.rate)
            job = client.delete(f"/admin/jobs/{job_id}", headers=ADMIN).json()
    return {"alone": alone, "beside": beside, "job_steps": job["step"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = task_arguments(__doc__)
    parser.add_argument("--steps", type=int, default=100, help="the job's steps (default: 100)")
    parser.add_argument("--tasks", type=int, default=4, help="held-out tasks benchmarked (default: 4)")
    parser.add_argument("--latency-seconds", type=float, default=20, help="each latency run (default: 20)")
    parser.add_argument("--rate", type=float, default=4, help="requests a second of the stream (default: 4)")
    parser.add_argument("--max-seq-len", type=int, default=512, help="the server's (default: 512)")
    args = parser.parse_args(argv)
    shots, tests = records(args.shots), records(args.test)
    names = [task for task in sorted(shots) if tests.get(task)][:args.tasks]
    rows = [bench_task(task, args, shots[task], tests[task]) for task in names]
    print(f"\nk = {args.k} shots, job: MHR-z {args.steps} steps; seconds from the POST to the new task's first answer")
    print(f"{'task':<22}{'job s':>8}{'steps/s':>9}{'route s':>9}{'EM zero-shot':>14}{'EM job':>8}{'EM route':>10}"
          f"{'|job - offline|':>17}")
    for row in rows:
        print(f"{row['task']:<22}{row['job_s']:>8.2f}{row['job_steps_per_s']:>9.1f}{row['route_s']:>9.2f}"
              f"{row['em_zero_shot']:>14.3f}{row['em_job']:>8.3f}{row['em_route']:>10.3f}{row['offline_gap']:>17.2e}")
    for key in ("job_s", "route_s", "em_zero_shot", "em_job", "em_route"):
        print(f"median {key}: {statistics.median(r[key] for r in rows):.3f}")
    latency = bench_latency(args, list(shots)[:4], tests[names[0]][0]["input"])
    print(f"\nlatency of a stream of {args.rate:g} requests/s (16 tokens each), {args.latency_seconds:g} s each")
    print(f"{'':<16}{'requests':>10}{'p50 s':>9}{'p99 s':>9}")
    for label in ("alone", "beside"):
        values = latency[label]
        print(f"{'no job' if label == 'alone' else 'job training':<16}{len(values):>10}"
              f"{percentile(values, 50):>9.3f}{percentile(values, 99):>9.3f}")
    ratio = percentile(latency["beside"], 99) / percentile(latency["alone"], 99)
    print(f"p99 with a job / without: {ratio:.2f} (the job ran {latency['job_steps']} steps meanwhile)")


if __name__ == "__main__":
    main()
