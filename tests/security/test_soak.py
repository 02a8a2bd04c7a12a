"""A bounded soak of the real server process: 64 clients mixing valid, oversized and malformed requests and clients
that leave mid-stream, while an admin adds, replaces and removes a task and reloads the bundle. It must end with
every valid request answered in full, no 5xx, and the server's memory back near where it started.

MHR_SOAK_SECONDS sets its length (default 45 s; the review's soak ran 180 s: `MHR_SOAK_SECONDS=180 pytest
tests/security/test_soak.py -s` prints the tallies).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import random
import time

import httpx

import mhr
from tests.security.conftest import KEY, server_process
from tests.server.admin_helpers import ADMIN, PROMPT, copy_bundle, logits_upload
from tests.server.conftest import DENSE, ROUTED, random_logits

CLIENTS = 64
SECONDS = float(os.environ.get("MHR_SOAK_SECONDS", "45"))
CHURNED = "churned"  # the task the admin keeps changing: served by its adapter or, while absent, zero-shot
STABLE = [*ROUTED[:3], DENSE]
RSS_GROWTH_MB = 150


def valid(rng: random.Random) -> tuple[str, str, dict, bool]:
    """(kind, path, body, streamed) of a request that must be served in full."""
    task = rng.choice([*STABLE, CHURNED])
    tokens = rng.randint(1, 12)
    kind = rng.choice(["completion", "stream", "chat", "generate"])
    if kind == "chat":
        return kind, "/v1/chat/completions", {"model": task, "messages": [{"role": "user", "content": PROMPT}],
                                              "max_tokens": tokens, "temperature": 0}, False
    if kind == "generate":
        return kind, f"/v1/tasks/{task}/generate", {"inputs": PROMPT, "max_new_tokens": tokens}, False
    return kind, "/v1/completions", {"model": task, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                                     "stream": kind == "stream"}, kind == "stream"


BAD = {  # kind -> (path, raw body, headers, expected status)
    "oversized": ("/v1/completions", json.dumps({"model": "task0", "prompt": "a" * 3_500_000}).encode(), KEY, 413),
    "no json": ("/v1/completions", b'{"model": "task0", "prompt": ', KEY, 400),
    "surrogate": ("/v1/completions", b'{"model": "task0", "prompt": "\\udfff"}', KEY, 400),
    "unknown field": ("/v1/completions", b'{"model": "task0", "prompt": "x", "beam": 4}', KEY, 400),
    "wrong key": ("/v1/completions", b'{"model": "task0", "prompt": "x"}', {"Authorization": "Bearer nope"}, 401),
    "bad name": ("/v1/tasks/bad..name/generate", b'{"inputs": "x"}', KEY, 400),
}


async def client(base: str, seed: int, deadline: float, tally: collections.Counter, failures: list) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=KEY) as http:
        while time.monotonic() < deadline:
            roll = rng.random()
            if roll < 0.6:
                kind, path, body, streamed = valid(rng)
                ok = await (_stream(http, path, body) if streamed else _whole(http, path, body))
                tally[kind] += 1
                if ok is not True:
                    failures.append((kind, body, ok))
            elif roll < 0.7:  # a client that leaves after the first chunk
                body = {"model": rng.choice(STABLE), "prompt": PROMPT, "max_tokens": 64, "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    await anext(r.aiter_lines())
                tally["left"] += 1
            else:
                kind = rng.choice(list(BAD))
                path, raw, headers, status = BAD[kind]
                r = await http.post(path, content=raw, headers={"Content-Type": "application/json"} | headers)
                tally[kind] += 1
                if r.status_code != status:
                    failures.append((kind, r.status_code, r.text[:200]))


async def _whole(http: httpx.AsyncClient, path: str, body: dict):
    r = await http.post(path, json=body)
    if r.status_code != 200:
        return r.status_code, r.text[:200]
    data = r.json()
    if "usage" in data:
        return data["usage"]["completion_tokens"] >= 1 or data
    return bool(data["outputs"]) or data


async def _stream(http: httpx.AsyncClient, path: str, body: dict):
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread())[:200]
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    return lines[-1] == "data: [DONE]" or lines[-3:]


async def admin(base: str, bundle: mhr.Bundle, deadline: float, tally: collections.Counter, failures: list) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=ADMIN) as http:
        for seed in itertools.count():
            if time.monotonic() > deadline:
                break
            change = ["put", "delete", "reload"][seed % 3]  # a delete always follows a put
            if change == "put":
                r = await http.put(f"/admin/tasks/{CHURNED}", content=logits_upload(random_logits(bundle, seed)))
            elif change == "delete":
                r = await http.delete(f"/admin/tasks/{CHURNED}")
            else:
                r = await http.post("/admin/reload")
            tally[f"admin {change}"] += 1
            if r.status_code != 200:
                failures.append((f"admin {change}", r.status_code, r.text[:200]))
            await asyncio.sleep(0.2)


async def soak(base: str, bundle: mhr.Bundle) -> tuple[collections.Counter, list]:
    tally, failures = collections.Counter(), []
    deadline = time.monotonic() + SECONDS
    await asyncio.gather(admin(base, bundle, deadline, tally, failures),
                         *(client(base, seed, deadline, tally, failures) for seed in range(CLIENTS)))
    return tally, failures


def test_64_clients_mixing_valid_oversized_and_malformed_requests_under_admin_churn(
        tiny_llama_path, bundle_path, tmp_path):
    bundle_dir = copy_bundle(bundle_path, tmp_path / "bundle")
    with server_process(tiny_llama_path, bundle_dir, tmp_path / "log", "--max-seq-len", "512") as server:
        warm = asyncio.run(_warm(server.base))
        before = server.rss_mb()
        tally, failures = asyncio.run(soak(server.base, mhr.Bundle.load(bundle_dir)))
        after = server.rss_mb()
        print(f"\n{SECONDS:.0f} s, {CLIENTS} clients: {dict(tally)}; RSS {before:.0f} -> {after:.0f} MiB")
        metrics = httpx.get(f"{server.base}/metrics").text
    assert warm and not failures, failures[:10]
    assert sum(tally[k] for k in ("completion", "stream", "chat", "generate")) > 100, tally
    assert all(tally[k] for k in BAD), tally
    assert 'status="error"' not in metrics and "internal_error" not in metrics
    assert after - before < RSS_GROWTH_MB, (before, after)


async def _warm(base: str) -> bool:
    """One request of each kind first, so that the memory measured from there is the server's working set."""
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=KEY) as http:
        results = [await (_stream(http, path, body) if streamed else _whole(http, path, body))
                   for _, path, body, streamed in (valid(random.Random(i)) for i in range(8))]
        for path, raw, headers, _ in BAD.values():
            await http.post(path, content=raw, headers={"Content-Type": "application/json"} | headers)
    return all(r is True for r in results)
