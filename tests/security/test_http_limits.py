"""Every request's cost is bounded before it is paid: the worst bodies of an adversarial review, sent to the real
server process while another client polls /health, which must answer each poll within 0.5 s, with the server's
memory staying within a stated bound.

The bounds (the server of the `served` fixture: max_seq_len 512, the tiny tokenizer, whose longest token has 7
characters): a prompt of more than 512 x 7 x 2 = 7,168 characters is refused before it is tokenized; a body
over the default limit (64 such prompts, 6 bytes a character: 2.8 MB) is refused before it is read, and so is any
body without the key.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from server.http.protocol import MAX_MESSAGES
from tests.security.conftest import KEY

POLL_LIMIT = 0.5    # seconds /health may take while the attacks run
RSS_GROWTH_MB = 150  # the server's memory after every attack, over its memory before


POLLER = """
import sys, time, httpx
times = []
with httpx.Client(base_url=sys.argv[1], timeout=10) as client:
    print("polling", flush=True)
    while not sys.stdin.readline().startswith("stop"):
        started = time.monotonic()
        try:
            ok = client.get("/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        times.append(time.monotonic() - started if ok else float("inf"))
print(len(times), max(times), flush=True)
"""


class HealthPoller:
    """Polls /health from a process of its own (so that the test's own work cannot delay it) while the `with`
    block runs, one poll each time it is nudged (every 20 ms, by a thread here); `worst` is the slowest answer
    in seconds (a poll that failed counts as infinitely slow), `polls` their number."""

    def __init__(self, base: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", POLLER, base], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "polling"
        self._stop = threading.Event()
        self._nudger = threading.Thread(target=self._nudge, daemon=True)

    def _nudge(self) -> None:
        while not self._stop.wait(0.02):
            self.process.stdin.write("poll\n")
            self.process.stdin.flush()

    def __enter__(self) -> HealthPoller:
        self._nudger.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._nudger.join()
        out, _ = self.process.communicate("stop\n", timeout=30)
        polls, worst = out.split()
        self.polls, self.worst = int(polls), float(worst)


def raw_request(base: str, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes, float]:
    """Send `head` (request line and headers, without the blank line) and `body` over a plain socket; returns the
    status, the response body and the seconds until the response began. Only what is given is sent: a declared
    Content-Length larger than `body` leaves the server waiting for the rest, unless it answers first."""
    url = urlparse(base)
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as s:
        started = time.monotonic()
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = s.recv(65536)
            assert chunk, f"connection closed before a response: {response!r}"
            response += chunk
        took = time.monotonic() - started
        head_bytes, _, rest = response.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head_bytes.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(head_bytes.split()[1]), rest, took


def completion(prompt, **extra) -> dict:
    return {"model": "task0", "prompt": prompt, "max_tokens": 1} | extra


def test_the_worst_bodies_are_refused_early_while_health_answers_and_memory_stays_bounded(served):
    base = served.base
    before = served.rss_mb()
    with HealthPoller(base) as poller, httpx.Client(base_url=base, timeout=60, headers=KEY) as client:
        # 8 MiB and 50 MB prompts with a valid key: over the body limit, refused before the body is read
        for size in (8 * 2**20, 50_000_000):
            r = client.post("/v1/completions", json=completion("a" * size))
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
        # a body under the limit whose prompt has more characters than can fit: refused untokenized
        r = client.post("/v1/completions", json=completion("kabadu " * 300_000))
        assert r.status_code == 400 and "characters" in r.json()["error"]["message"], r.text[:300]
        assert r.json()["error"]["code"] == "context_length_exceeded"
        # the longest prompt that is tokenized (7,168 characters), in a full batch of 64: tokenized off the loop
        r = client.post("/v1/completions", json=completion(["river stone " * 597] * 64))
        assert r.status_code == 400 and "tokens" in r.json()["error"]["message"], r.text[:300]
        # 200,000 chat messages: over the body limit; MAX_MESSAGES + 1 short ones: refused by count
        messages = [{"role": "user", "content": "hi"}]
        r = client.post("/v1/chat/completions", json={"model": "task0", "messages": messages * 200_000})
        assert r.status_code == 413, r.text[:300]
        r = client.post("/v1/chat/completions", json={"model": "task0", "messages": messages * (MAX_MESSAGES + 1)})
        assert r.status_code == 400 and "messages" in r.text, r.text[:300]
        # messages whose text together cannot fit
        r = client.post("/v1/chat/completions", json={"model": "task0", "messages": [
            {"role": "user", "content": "kabadu " * 600}] * 100})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
        # the server still serves
        r = client.post("/v1/completions", json=completion("The quiet river"))
        assert r.status_code == 200, r.text
    assert poller.worst < POLL_LIMIT, f"/health took {poller.worst:.3f} s; polls: {poller.polls}"
    grown = served.rss_mb() - before
    print(f"worst /health {poller.worst:.3f} s over {poller.polls} polls; the server grew by {grown:.0f} MiB")
    assert grown < RSS_GROWTH_MB, f"the server grew by {grown:.0f} MiB"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/tasks/task0/generate",
                                  "/admin/tasks/new-task", "/admin/reload"])
def test_a_body_without_the_key_is_refused_before_it_is_read(served, path):
    """A 50 MB body is announced but never sent: the 401 comes at once, so the server read none of it."""
    host = urlparse(served.base).netloc
    status, body, took = raw_request(served.base, f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                                                  "Content-Type: application/json\r\nContent-Length: 50000000")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", body
    assert took < 5


def test_an_announced_body_over_the_limit_is_refused_before_it_is_read(served):
    host = urlparse(served.base).netloc
    status, body, _ = raw_request(served.base, f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
                                               f"Authorization: Bearer {KEY['Authorization'].split()[1]}\r\n"
                                               "Content-Type: application/json\r\nContent-Length: 50000000")
    assert status == 413 and b"--max-body-mb" in body, body


def test_a_chunked_body_is_read_no_further_than_the_limit(served):
    """No Content-Length: the body comes in chunks, and the server stops reading past its limit."""
    def chunks():
        yield b'{"model": "task0", "prompt": "'
        for _ in range(40):  # 40 MiB if it were all read
            yield b"a" * 2**20
        yield b'"}'

    r = httpx.post(f"{served.base}/v1/completions", content=chunks(), timeout=60,
                   headers=KEY | {"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]


def test_a_setting_raises_the_body_limit(tiny_llama_path, bundle_path, tmp_path):
    from tests.security.conftest import server_process
    from tests.server.admin_helpers import copy_bundle

    bundle = copy_bundle(bundle_path, tmp_path / "bundle")
    with server_process(tiny_llama_path, bundle, tmp_path / "log", "--max-body-mb", "0.01") as server:
        r = httpx.post(f"{server.base}/v1/completions", json=completion("x" * 20_000), headers=KEY, timeout=60)
        assert r.status_code == 413 and "10485 bytes" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{server.base}/v1/completions", json=completion("The quiet river"), headers=KEY, timeout=60)
        assert r.status_code == 200, r.text
