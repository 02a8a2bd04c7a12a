"""Streams under change and loss: the adapter a stream names is the one that produced it, clients that leave are
counted, and a shutdown's drain deadline ends every open request with an error a client can read rather than a
cut connection."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.security.conftest import KEY, server_process
from tests.server import loopback as http
from tests.server.admin_helpers import ADMIN, PROMPT, admin_app, copy_bundle, engine_on
from tests.server.conftest import ROUTED
from tests.server.http.test_faults import LONG, idle, wait_until
from tests.server.loopback import serve_app


@pytest.fixture
def bundle_dir(bundle_path, tmp_path):
    return copy_bundle(bundle_path, tmp_path / "bundle")


def data_lines(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_a_stream_names_the_adapter_that_served_it_when_its_task_changed_while_it_waited(
        tiny_llama_path, tiny_tokenizer, bundle_dir):
    engine = engine_on(tiny_llama_path, tiny_tokenizer, bundle_dir, max_seq_len=512, max_running=1)
    task = ROUTED[2]
    with serve_app(admin_app(engine, bundle_dir)) as base:
        blocker = threading.Thread(target=http.post, args=(f"{base}/v1/completions",), kwargs={"json": {
            "model": LONG, "prompt": PROMPT, "max_tokens": 300, "temperature": 0}})
        blocker.start()  # holds the only row
        wait_until(lambda: engine.stats().running == 1, what="the blocking request to run")
        got = {}

        def stream() -> None:
            body = {"model": task, "prompt": PROMPT, "max_tokens": 8, "stream": True, "temperature": 0}
            with http.stream("POST", f"{base}/v1/completions", json=body) as r:
                got["header"], got["lines"] = r.headers["x-mhr-adapter"], data_lines(r)

        streamer = threading.Thread(target=stream)
        streamer.start()  # accepted for `task`, waits for the row
        wait_until(lambda: engine.stats().waiting == 1, what="the stream to wait")
        assert http.delete(f"{base}/admin/tasks/{task}", headers=ADMIN).status_code == 200
        streamer.join(60)
        blocker.join(60)
        chunks = [json.loads(line) for line in got["lines"][:-1]]
        assert got["lines"][-1] == "[DONE]" and chunks
        assert got["header"] == "zero-shot" and {c["mhr"]["adapter"] for c in chunks} == {"zero-shot"}, got
        metrics = http.get(f"{base}/metrics").text
        assert 'mhr_requests_total{adapter="zero-shot",status="length"} 1.0' in metrics
        assert f'adapter="{task}"' not in metrics


def counted(base: str, status: str) -> float:
    lines = http.get(f"{base}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines
               if line.startswith("mhr_requests_total{") and f'status="{status}"' in line)


def test_requests_whose_clients_left_are_counted_once_as_cancelled(tiny_llama_path, tiny_tokenizer, bundle_dir):
    engine = engine_on(tiny_llama_path, tiny_tokenizer, bundle_dir, max_seq_len=512)
    with serve_app(admin_app(engine, bundle_dir)) as base:
        body = {"model": LONG, "prompt": PROMPT, "max_tokens": 480, "temperature": 0}
        for route, stream in (("/v1/completions", True), ("/v1/tasks/task1/generate", True)):
            for _ in range(3):  # streams left after their first chunk
                payload = ({"inputs": PROMPT, "max_new_tokens": 480} if "generate" in route else body) | {
                    "stream": stream}
                with http.stream("POST", f"{base}{route}", json=payload) as r:
                    next(r.iter_lines())
        for _ in range(2):  # whole responses given up on
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/v1/completions", json=body, timeout=0.3)
        wait_until(lambda: idle(engine) and counted(base, "cancelled") == 8, what="8 cancelled requests counted")
        time.sleep(0.5)  # and no more
        assert counted(base, "cancelled") == 8


def in_engine(base: str) -> float:
    """Requests running or waiting in the engine, from /metrics."""
    gauges = [line.split() for line in http.get(f"{base}/metrics").text.splitlines()
              if line.startswith(("mhr_running_requests ", "mhr_waiting_requests "))]
    return sum(float(value) for _, value in gauges)


def test_the_drain_deadline_ends_open_streams_with_an_error_event_and_waiting_ones_with_503(
        tiny_llama_path, bundle_dir, tmp_path):
    with server_process(tiny_llama_path, bundle_dir, tmp_path / "log", "--max-seq-len", "512", "--max-running", "4",
                        "--drain-seconds", "1") as server:
        ends: list = []
        started = threading.Semaphore(0)

        def stream() -> None:
            body = {"model": LONG, "prompt": PROMPT, "max_tokens": 480, "stream": True, "temperature": 0}
            try:
                with httpx.stream("POST", f"{server.base}/v1/completions", json=body, headers=KEY, timeout=60) as r:
                    if r.status_code != 200:
                        ends.append((r.status_code, json.loads(r.read())["error"]["code"]))
                        return
                    started.release()
                    ends.append((200, data_lines(r)[-1]))
            except httpx.HTTPError as e:  # a body cut short
                ends.append(("cut", repr(e)))

        threads = [threading.Thread(target=stream) for _ in range(16)]
        for t in threads:
            t.start()
        assert started.acquire(timeout=60)
        wait_until(lambda: in_engine(server.base) == 16, what="every stream to reach the engine")
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert server.process.wait(timeout=30) == 0, server.log.read_text()
    assert len(ends) == 16 and not [e for e in ends if e[0] == "cut"], ends
    for status, last in ends:
        if status == 200:
            assert last == "[DONE]" or json.loads(last)["error"]["code"] == "shutting_down", last
        else:
            assert (status, last) == (503, "shutting_down")
    assert (503, "shutting_down") in ends  # 16 streams of 480 tokens on 4 rows outlast a 1 s drain
