"""Faults over real loopback HTTP: clients that go away, tasks changed under load, SIGTERM with a stream open.

Waits poll the engine with generous timeouts; nothing asserts on timings. The SIGTERM test runs the real
process (`python -m server`) on the tiny model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

import mhr
from server.http.app import ADAPTER_HEADER, begin_shutdown, create_app
from server.main import draining_server
from tests.processes import free_port
from tests.server import loopback as http
from tests.server.admin_helpers import (
    ADMIN,
    PROMPT,
    admin_app,
    copy_bundle,
    engine_on,
    generate,
    logits_upload,
)
from tests.server.conftest import ROUTED, random_logits
from tests.server.loopback import serve_app

LONG = ROUTED[1]  # greedy on this task runs to max_tokens without meeting EOS (the tiny model, seed 0)
NOT_FINISHED = 400  # ... for at least this many tokens: fewer decoded rows prove a request was cut short


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def bundle_dir(bundle_path, tmp_path):
    return copy_bundle(bundle_path, tmp_path / "bundle")


def idle(engine) -> bool:
    """No request running or waiting, every KV row free, and no slot referenced but the zero-shot pin."""
    stats = engine.stats()
    with engine._lock:  # a consistent view between steps
        referenced = {key.name for key, slot in engine.cache.resident().items() if engine.cache.refs(slot)}
        rows = engine.kv.n_active
    return stats.running == 0 and stats.waiting == 0 and rows == 0 and referenced <= {"zero-shot"}


# ----- clients that go away -------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["completions", "chat", "generate"])
def test_a_client_leaving_mid_stream_frees_its_slot_and_kv_row(route, tiny_llama_path, tiny_tokenizer, bundle_dir):
    engine = engine_on(tiny_llama_path, tiny_tokenizer, bundle_dir, max_seq_len=512)
    url, body = {
        "completions": ("/v1/completions", {"model": LONG, "prompt": PROMPT, "max_tokens": 480, "stream": True,
                                             "temperature": 0}),
        "chat": ("/v1/chat/completions", {"model": LONG, "messages": [{"role": "user", "content": PROMPT}],
                                          "max_tokens": 480, "stream": True, "temperature": 0}),
        "generate": (f"/v1/tasks/{LONG}/generate", {"inputs": PROMPT, "max_new_tokens": 480, "stream": True}),
    }[route]
    with serve_app(admin_app(engine, bundle_dir)) as base:
        with httpx.Client(base_url=base, timeout=60) as client, client.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(3), strict=False)]
            assert all(line.startswith("data: ") or not line for line in got)
            key = engine.tasks.resolve(LONG)
            slot = engine.cache.slot_of(key)
            assert slot is not None and engine.cache.refs(slot) == 1 and engine.kv.n_active == 1
        # the response is closed mid-stream: the connection drops
        wait_until(lambda: idle(engine), what="the request to be cancelled and its slot and row freed")
        assert engine.cache.refs(slot) == 0 and engine.stats().batch_rows < NOT_FINISHED
        # the server goes on serving, from the same (now idle) slot
        r = http.post(f"{base}/v1/completions", json={"model": LONG, "prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 200 and r.headers[ADAPTER_HEADER] == LONG


def test_a_non_streaming_client_leaving_is_cancelled(tiny_llama_path, tiny_tokenizer, bundle_dir):
    engine = engine_on(tiny_llama_path, tiny_tokenizer, bundle_dir, max_seq_len=512)
    with serve_app(admin_app(engine, bundle_dir)) as base:

        async def leave_early() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=http.TIMEOUT) as client:
                request = asyncio.ensure_future(client.post(
                    "/v1/completions", json={"model": LONG, "prompt": PROMPT, "max_tokens": 480, "temperature": 0}))
                while engine.stats().batch_rows < 3:  # running and decoding
                    await asyncio.sleep(0.01)
                request.cancel()  # closes the connection before the answer
                with pytest.raises(asyncio.CancelledError):
                    await request

        asyncio.run(asyncio.wait_for(leave_early(), 60))
        wait_until(lambda: idle(engine), what="the request to be cancelled")
        assert engine.stats().batch_rows < NOT_FINISHED


# ----- tasks changed under load -------------------------------------------------------------------

def _run_concurrently(base: str, bodies: list[dict], during: Callable[[], None]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            requests = [asyncio.ensure_future(client.post("/v1/completions", json=b)) for b in bodies]
            await asyncio.to_thread(during)
            return await asyncio.gather(*requests)

    return asyncio.run(main())


@pytest.mark.parametrize("zero_shot", [True, False])
def test_tasks_replaced_and_deleted_under_load_lose_no_request(zero_shot, tiny_llama_path, tiny_tokenizer,
                                                                bundle_dir):
    """Requests already running finish on the old weights; waiting ones get the new weights (replaced) or,
    for a deleted task, the zero-shot adapter (or 503 task_unavailable when zero-shot serving is off)."""
    replaced, deleted, tokens = ROUTED[2], ROUTED[3], 48  # decoding outlasts the admin calls
    old = mhr.Bundle.load(bundle_dir)
    new_logits = random_logits(old, seed=77)
    new = mhr.Bundle.load(bundle_dir)
    new.add_routed_task(replaced, new_logits, replace=True)
    reference_old = engine_on(tiny_llama_path, tiny_tokenizer, old)
    reference_new = engine_on(tiny_llama_path, tiny_tokenizer, new)
    expect = {("old", t): generate(reference_old, tiny_tokenizer, t, max_tokens=tokens) for t in (replaced, deleted)}
    expect["new", replaced] = generate(reference_new, tiny_tokenizer, replaced, max_tokens=tokens)
    expect["zero-shot"] = generate(reference_old, tiny_tokenizer, "deleted-task", max_tokens=tokens)
    assert len({expect["old", replaced], expect["new", replaced]}) == 2
    assert expect["old", deleted][0] != expect["zero-shot"][0]

    engine = engine_on(tiny_llama_path, tiny_tokenizer, bundle_dir, max_running=4, allow_zero_shot=zero_shot)
    bodies = [{"model": t, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
              for _ in range(10) for t in (replaced, deleted)]
    with serve_app(admin_app(engine, bundle_dir)) as base:

        def change_tasks() -> None:
            wait_until(lambda: engine.stats().running == 4 and engine.stats().waiting >= 8, what="a full batch")
            r = http.put(f"{base}/admin/tasks/{replaced}", content=logits_upload(new_logits), headers=ADMIN)
            assert r.status_code == 200, r.text
            r = http.delete(f"{base}/admin/tasks/{deleted}", headers=ADMIN)
            assert r.status_code == 200, r.text

        responses = _run_concurrently(base, bodies, change_tasks)
        wait_until(lambda: idle(engine), what="every slot to be released")
        assert replaced in engine.tasks.task_names and deleted not in engine.tasks.task_names
        assert not [k for k in engine.cache.resident() if k.name == deleted]

    outcomes = {"old": 0, "new": 0, "zero-shot": 0, "503": 0}
    for body, r in zip(bodies, responses, strict=True):
        task = body["model"]
        if r.status_code == 503:
            assert task == deleted and not zero_shot and r.json()["error"]["code"] == "task_unavailable", r.text
            outcomes["503"] += 1
            continue
        assert r.status_code == 200, r.text
        got = (r.json()["choices"][0]["text"], r.json()["mhr"]["adapter"])
        assert r.headers[ADAPTER_HEADER] == got[1]
        allowed = {"old": expect["old", task], "new": expect.get(("new", task)),
                   "zero-shot": expect["zero-shot"] if task == deleted and zero_shot else None}
        matches = [name for name, value in allowed.items() if value == got]
        assert matches, (task, got, allowed)
        outcomes[matches[0]] += 1
    assert outcomes["old"] >= 4  # the batch running at the change finished on the old weights
    assert outcomes["new"] >= 1 and (outcomes["zero-shot"] if zero_shot else outcomes["503"]) >= 1, outcomes
    assert sum(outcomes.values()) == len(bodies)


# ----- shutting down ------------------------------------------------------------------------------

def test_ready_answers_503_once_shutdown_begins_while_requests_are_still_served(make_engine):
    app = create_app(make_engine())
    with serve_app(app) as base:
        assert http.get(f"{base}/ready").status_code == 200
        begin_shutdown(app)  # what the stop signal does first (below: the server's handle_exit calls it)
        r = http.get(f"{base}/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert http.get(f"{base}/health").status_code == 200
        ok = http.post(f"{base}/v1/completions", json={"model": ROUTED[0], "prompt": PROMPT, "max_tokens": 2})
        assert ok.status_code == 200
    other = FastAPI()
    other.state.lifecycle = {"ready": True, "stopping": False}
    server = draining_server(uvicorn.Config(other))
    server.handle_exit(signal.SIGTERM, None)
    assert other.state.lifecycle["stopping"] and server.should_exit


@contextmanager
def server_process(tiny_llama_path, bundle_dir, tmp_path, env=None):
    """`python -m server` on a free port, ready to serve: yields (process, base URL, its log file)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--bundle", str(bundle_dir), "--model", str(tiny_llama_path),
         "--port", str(port), "--max-seq-len", "512", "--drain-seconds", "20"],
        stdout=log, stderr=subprocess.STDOUT,
        env=os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"} | (env or {}))
    try:
        def ready() -> bool:
            assert process.poll() is None, log.seek(0) or log.read()
            try:
                return httpx.get(f"{base}/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=120, what="the server to start")
        yield process, base, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_sigterm_drains_a_running_stream_refuses_new_work_and_exits_0(tiny_llama_path, bundle_dir, tmp_path):
    with server_process(tiny_llama_path, bundle_dir, tmp_path) as (process, base, log):
        body = {"model": LONG, "prompt": PROMPT, "max_tokens": 120, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            events = [next(lines) for _ in range(2)]
            process.send_signal(signal.SIGTERM)
            readiness = []
            for _ in range(5):  # while the stream drains: never ready again
                try:
                    readiness.append(httpx.get(f"{base}/ready", timeout=2).status_code)
                except httpx.TransportError:
                    readiness.append("refused")
                time.sleep(0.05)
            assert 200 not in readiness, readiness
            try:
                refused = httpx.post(f"{base}/v1/completions", timeout=5,
                                     json={"model": LONG, "prompt": PROMPT, "max_tokens": 2}).status_code
            except httpx.TransportError:
                refused = "refused"
            assert refused in ("refused", 503)
            events += list(lines)
        data = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
        assert data[-1] == "[DONE]", data[-3:]
        chunks = [json.loads(d) for d in data[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length", (len(chunks), text)
        assert process.wait(timeout=30) == 0, log.seek(0) or log.read()


def test_a_machine_without_a_compiler_still_serves_and_says_why_it_is_slower(tiny_llama_path, bundle_dir, tmp_path):
    no_compiler = {"CXX": str(tmp_path / "no-such-c++"), "MHR_KERNEL_DIR": str(tmp_path / "kernels")}
    with server_process(tiny_llama_path, bundle_dir, tmp_path, env=no_compiler) as (_, base, log):
        for task in ROUTED[:2]:  # served on torch ops
            r = http.post(f"{base}/v1/completions", json={"model": task, "prompt": PROMPT, "max_tokens": 3},
                           timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()  # its text may be a partial UTF-8 character: the counts say it was generated
            assert body["usage"]["completion_tokens"] == 3 and body["mhr"]["adapter"] == task
            assert body["choices"][0]["finish_reason"] == "length"
        log.seek(0)
        assert "WARNING: CPU kernels unavailable" in log.read()
