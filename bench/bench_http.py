"""HTTP load generator: requests/s, latency and time to first token at several client counts.

    python -m bench.bench_http [--small] [--subprocess | --url URL] [--clients 1 16 64] [--requests N]
                               [--max-tokens 16] [--per-process 16]

Without --url it builds a backbone and a bundle of 16 routed tasks in a temp dir and serves them in this
process (uvicorn on a loopback port, in a thread: client and server share the CPU and the GIL), or with
--subprocess as `python -m server` in a process of its own.
--small uses the tiny test model of `tests/tiny.py` (runs in well under a minute on 2 cores); the default
is the reference workload's backbone shape (hidden 512, 8 layers) with the tiny tokenizer's vocabulary.
With --url it loads a running server instead (tasks from its /v1/tasks).

Each client count runs a closed loop: that many clients each send their next request as soon as the
last one is answered, over a mixed workload (every task, the zero-shot path, the three generation
routes, a third of the requests streamed, greedy), with at most --per-process clients in one client process
(one asyncio httpx client does not keep up with more). Prints a table; never asserts: numbers depend on the
machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROUTES = ("completions", "chat", "generate")
PROMPTS = ("The quiet river copies the stone", "old house", "sum of 3 4 5 is", "Input: kalo Output:",
           "the small red bird finds the road by the lamp", "mira tune sovi da pe")
ZERO_SHOT_NAME = "a-task-nobody-trained"   # unknown to the bundle: served by the zero-shot adapter


# ----- the workload -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One request: route, task (model name), prompt, streamed or not, tokens to generate."""

    route: str
    task: str
    prompt: str
    stream: bool
    max_tokens: int

    def http(self) -> tuple[str, dict]:
        """(path, JSON body) of this call; greedy, usage included in streams where the route has it."""
        if self.route == "generate":
            return f"/v1/tasks/{self.task}/generate", {"inputs": self.prompt, "max_new_tokens": self.max_tokens,
                                                       "temperature": 0, "stream": self.stream}
        body = {"model": self.task, "max_tokens": self.max_tokens, "temperature": 0, "stream": self.stream}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.route == "chat":
            return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": self.prompt}]}
        return "/v1/completions", body | {"prompt": self.prompt}


def build_workload(tasks: Sequence[str], n: int, max_tokens: int, stream_every: int = 3) -> list[Call]:
    """`n` calls cycling through `tasks` (mixed tasks: consecutive calls hit different adapters), the three
    routes and the prompts; every `stream_every`-th call streams. Deterministic."""
    if not tasks or n < 0 or stream_every < 1:
        raise ValueError("need at least one task, n >= 0 and stream_every >= 1")
    return [Call(ROUTES[i % len(ROUTES)], tasks[i % len(tasks)], PROMPTS[i % len(PROMPTS)],
                 stream=i % stream_every == stream_every - 1, max_tokens=max_tokens) for i in range(n)]


# ----- statistics ---------------------------------------------------------------------------------

@dataclass
class Sample:
    """The outcome of one call, as the client saw it (seconds)."""

    status: int
    latency: float
    first_token: float | None = None   # streams only: until the first chunk carrying text
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default);
    None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (rank - low)


@dataclass
class Summary:
    clients: int
    sent: int
    ok: int
    errors: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    p50: float | None
    p99: float | None
    ttft_p50: float | None
    ttft_p99: float | None


def summarize(clients: int, samples: Sequence[Sample], seconds: float) -> Summary:
    """Throughput over the wall time of the run; latencies of successful calls only."""
    good = [s for s in samples if s.ok]
    latencies = [s.latency for s in good]
    firsts = [s.first_token for s in good if s.first_token is not None]
    rate = (lambda x: x / seconds) if seconds > 0 else (lambda x: 0.0)
    return Summary(clients, len(samples), len(good), len(samples) - len(good), seconds, rate(len(good)),
                   rate(sum(s.tokens for s in good)), percentile(latencies, 50), percentile(latencies, 99),
                   percentile(firsts, 50), percentile(firsts, 99))


def table(summaries: Sequence[Summary]) -> str:
    """A markdown table, latencies in milliseconds."""
    def ms(x: float | None) -> str:
        return "–" if x is None else f"{x * 1000:.1f}"

    rows = ["| clients | requests | errors | req/s | tok/s | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows += [f"| {s.clients} | {s.sent} | {s.errors} | {s.requests_per_s:.1f} | {s.tokens_per_s:.0f} | {ms(s.p50)} "
             f"| {ms(s.p99)} | {ms(s.ttft_p50)} | {ms(s.ttft_p99)} |" for s in summaries]
    return "\n".join(rows)


# ----- the client -----------------------------------------------------------------------------------

async def send(client: httpx.AsyncClient, call: Call) -> Sample:
    path, body = call.http()
    start = time.perf_counter()
    try:
        if not call.stream:
            r = await client.post(path, json=body)
            if r.status_code != 200:
                return Sample(r.status_code, time.perf_counter() - start)
            data = r.json()
            tokens = (data["outputs"][0]["completion_tokens"] if call.route == "generate"
                      else data["usage"]["completion_tokens"])
            return Sample(200, time.perf_counter() - start, tokens=tokens)
        first, events, tokens = None, 0, None
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Sample(r.status_code, time.perf_counter() - start)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return Sample(599, time.perf_counter() - start)
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif first is None:
                    first = time.perf_counter() - start
                events += 1
        # the native stream has no usage: one event per decoded piece of text is close enough
        return Sample(200, time.perf_counter() - start, first, events if tokens is None else tokens)
    except httpx.HTTPError:
        return Sample(0, time.perf_counter() - start)


async def drive(url: str, calls: Sequence[Call], clients: int, timeout: float = 300.0) -> list[Sample]:
    """`clients` concurrent clients of one httpx client working through `calls` (closed loop)."""
    pending = iter(calls)
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def worker() -> None:
            for call in pending:  # one shared iterator: each call is sent once
                samples.append(await send(client, call))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return samples


def _client_process(url: str, calls: list[Call], clients: int, barrier, results) -> None:
    barrier.wait()  # start together, after every process has imported and is ready
    results.put(asyncio.run(drive(url, calls, clients)))


def run_level(url: str, calls: Sequence[Call], clients: int, per_process: int = 16) -> Summary:
    """`clients` concurrent clients working through `calls`; the summary of the run.

    One asyncio httpx client drives at most `per_process` connections: more of them in one process make
    the load generator itself the bottleneck (measured here: 64 clients in one process saw a 4x worse
    p99 than the same 64 in four processes). Beyond that, calls and clients are split over processes.
    """
    n_proc = max(1, -(-clients // per_process))
    if n_proc == 1:
        start = time.perf_counter()
        samples = asyncio.run(drive(url, calls, clients))
        return summarize(clients, samples, time.perf_counter() - start)
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork: this process may run a server in threads
    barrier, results = ctx.Barrier(n_proc + 1), ctx.Queue()
    shares = [clients // n_proc + (i < clients % n_proc) for i in range(n_proc)]
    procs = [ctx.Process(target=_client_process, args=(url, list(calls[i::n_proc]), shares[i], barrier, results))
             for i in range(n_proc)]
    for proc in procs:
        proc.start()
    barrier.wait()
    start = time.perf_counter()
    samples = [s for _ in procs for s in results.get()]
    seconds = time.perf_counter() - start
    for proc in procs:
        proc.join()
    return summarize(clients, samples, seconds)


# ----- a server in this process -----------------------------------------------------------------

def build_backbone(out: Path, small: bool) -> Path:
    """The tiny test model (--small) or a REFERENCE-shaped one sharing its tokenizer; returns its dir."""
    from tests.tiny import build_tiny_llama, tiny_llama_config, train_tokenizer

    if small:
        return build_tiny_llama(out / "model", seed=0)
    import torch
    from transformers import LlamaForCausalLM

    from bench.workload import REFERENCE_SHAPE

    tokenizer = train_tokenizer()
    config = tiny_llama_config(tokenizer)
    for key, value in REFERENCE_SHAPE.items():
        if key != "vocab_size":
            setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model"


def build_bundle(model_dir: Path, out: Path, n_tasks: int) -> list[str]:
    """A bundle of `n_tasks` routed tasks with random skills and routing under `out`; returns the names."""
    import torch
    from transformers import AutoModelForCausalLM

    import mhr
    from bench.workload import TARGETS

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = mhr.MHRConfig(n_skills=8, n_heads=4, rank=8, alpha=16.0, target_modules=TARGETS)
    tasks = [f"task{i:02d}" for i in range(n_tasks)]
    layers = mhr.inject(model, config, n_tasks=n_tasks)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters: B nonzero, routing away from uniform
        for layer in layers.values():
            layer.lora_B.normal_(std=0.02, generator=g)
            layer.router.logits.normal_(std=2.0, generator=g)
    mhr.Bundle.from_model(model, config, backbone=str(model_dir), tasks=tasks).save(out)
    return tasks


@contextmanager
def local_server(small: bool, n_tasks: int, slots: int, max_running: int) -> Iterator[tuple[str, list[str]]]:
    """Build a backbone and bundle in a temp dir and serve them on loopback; yields (url, task names)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mhr
    from server.config import ServerConfig
    from server.engine.core import Engine
    from server.http.app import create_app
    from tests.server.loopback import serve_app

    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        model_dir = build_backbone(Path(tmp), small)
        tasks = build_bundle(model_dir, Path(tmp) / "bundle", n_tasks)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        config = ServerConfig(n_slots=slots, max_running=max_running, max_seq_len=128, max_waiting=4096)
        engine = Engine(model, mhr.Bundle.load(Path(tmp) / "bundle"), config, AutoTokenizer.from_pretrained(model_dir))
        with serve_app(create_app(engine)) as url:
            yield url, tasks


@contextmanager
def server_process(small: bool, n_tasks: int, slots: int, max_running: int,
                   threads: int) -> Iterator[tuple[str, list[str]]]:
    """Like `local_server`, but `python -m server` in a process of its own (no GIL shared with the client)."""
    import os
    import socket
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        model_dir = build_backbone(Path(tmp), small)
        tasks = build_bundle(model_dir, Path(tmp) / "bundle", n_tasks)
        with socket.socket() as s:  # a free port (released just before the server binds it)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "server", "--bundle", str(Path(tmp) / "bundle"), "--model", str(model_dir),
                   "--slots", str(slots), "--max-running", str(max_running), "--max-seq-len", "128",
                   "--max-waiting", "4096", "--port", str(port)]
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while not _ready(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {' '.join(command)}")
                time.sleep(0.2)
            yield url, tasks
        finally:
            process.terminate()
            process.wait(60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def remote_tasks(url: str) -> list[str]:
    return [t["name"] for t in httpx.get(f"{url}/v1/tasks", timeout=30).json()["tasks"]]


def bench(url: str, tasks: list[str], clients: Sequence[int], requests: int | None, max_tokens: int,
          per_process: int = 16) -> list[Summary]:
    names = [*tasks, ZERO_SHOT_NAME]
    run_level(url, build_workload(names, 2 * len(names), max_tokens), 8)  # warm up: load every adapter
    summaries = []
    for c in clients:
        n = requests or max(32, 4 * c)
        summaries.append(run_level(url, build_workload(names, n, max_tokens), c, per_process))
        print(table(summaries[-1:]).splitlines()[-1], flush=True)
    return summaries


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="the tiny test model (quick)")
    p.add_argument("--url", help="load a running server instead of starting one")
    p.add_argument("--subprocess", action="store_true", help="start the server as a process of its own")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--requests", type=int, help="requests per client count (default: max(32, 4 x clients))")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--per-process", type=int, default=16, help="clients per load-generator process")
    p.add_argument("--tasks", type=int, default=16, help="routed tasks in the built bundle")
    p.add_argument("--slots", type=int, default=32, help="adapter slots of the built server")
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the built server")
    args = p.parse_args(argv)

    if args.url:
        summaries = bench(args.url, remote_tasks(args.url), args.clients, args.requests, args.max_tokens,
                          args.per_process)
    elif args.subprocess:
        with server_process(args.small, args.tasks, args.slots, args.max_running, args.threads) as (url, tasks):
            summaries = bench(url, tasks, args.clients, args.requests, args.max_tokens, args.per_process)
    else:
        import torch

        torch.set_num_threads(args.threads)
        with local_server(args.small, args.tasks, args.slots, args.max_running) as (url, tasks):
            summaries = bench(url, tasks, args.clients, args.requests, args.max_tokens, args.per_process)
    print()
    print(table(summaries))


if __name__ == "__main__":
    main()
