"""Load and backpressure over real HTTP: many concurrent clients, many tasks, a small adapter cache.

References come from a separate engine running each request alone (`Engine.generate`, no HTTP), computed
before the load starts; under load every greedy output must equal its reference, token for token, while
the server's cache evicts and reloads adapters. The backpressure test floods an engine with tiny queues
and checks 429s, bounded queues and that the server keeps serving. No timing assertions: only generous
timeouts so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from dataclasses import dataclass

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

import mhr
from server.config import ServerConfig
from server.engine.core import Engine
from server.engine.requests import Request, SamplingParams
from server.http.app import ADAPTER_HEADER, create_app
from tests.server import loopback as http
from tests.server.conftest import DENSE, ROUTED, random_logits
from tests.server.loopback import serve_app

EXTRA_TASKS = [f"load-task-{i:02d}" for i in range(12)]
TASKS = [*ROUTED, *EXTRA_TASKS, DENSE]         # 18 routed tasks and one dense task
UNKNOWN = ["never-trained-a", "never-trained-b", "never-trained-c"]  # served by the zero-shot adapter
PROMPTS = ["The quiet river copies the stone", "old house", "sum of 3 4 5 is",
           "Input: kalo Output:", "the small red bird finds the road", "mira tune sovi"]
CLIENTS = 64
REQUESTS_PER_CLIENT = 3
MAX_TOKENS = 6
TIMEOUT = httpx.Timeout(120.0)


@pytest.fixture(scope="module")
def load_bundle_path(bundle_path, tmp_path_factory):
    """The session bundle plus 12 more routed tasks with random routing (19 tasks in all)."""
    bundle = mhr.Bundle.load(bundle_path)
    for i, name in enumerate(EXTRA_TASKS):
        bundle.add_routed_task(name, random_logits(bundle, seed=100 + i))
    path = tmp_path_factory.mktemp("load") / "bundle"
    bundle.save(path)
    return path


def engine_on(model_path, bundle_path, tokenizer, **overrides) -> Engine:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return Engine(model, mhr.Bundle.load(bundle_path), ServerConfig(**overrides), tokenizer)


@dataclass(frozen=True)
class Call:
    """One HTTP request of the load: which route, task and prompt, streamed or not."""

    route: str      # "completions", "chat" or "generate"
    task: str
    prompt: str
    stream: bool

    def ids(self, tokenizer) -> list[int]:
        if self.route != "chat":
            return tokenizer(self.prompt).input_ids
        ids = tokenizer.apply_chat_template(self.messages(), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]

    def http(self) -> tuple[str, dict]:
        if self.route == "generate":
            return f"/v1/tasks/{self.task}/generate", {"inputs": self.prompt, "max_new_tokens": MAX_TOKENS,
                                                       "temperature": 0, "stream": self.stream}
        body = {"model": self.task, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": self.stream}
        if self.route == "chat":
            return "/v1/chat/completions", body | {"messages": self.messages()}
        return "/v1/completions", body | {"prompt": self.prompt}


def make_calls(seed: int = 0) -> list[list[Call]]:
    """REQUESTS_PER_CLIENT calls for each client; every task and unknown name is used on every route, about
    a third stream."""
    rng = random.Random(seed)
    names = [*TASKS, *UNKNOWN]
    # one prompt per name keeps the references few (they run one by one); neighbours differ in length
    calls = [Call(rng.choice(["completions", "chat", "generate"]), names[i % len(names)],
                  PROMPTS[i % len(names) % len(PROMPTS)], stream=rng.random() < 0.35)
             for i in range(CLIENTS * REQUESTS_PER_CLIENT)]
    rng.shuffle(calls)
    return [calls[c::CLIENTS] for c in range(CLIENTS)]


async def send(client: httpx.AsyncClient, call: Call) -> tuple[int, str, str]:
    """(status, generated text, serving adapter) of one call, read from JSON or from the SSE stream."""
    path, body = call.http()
    if not call.stream:
        r = await client.post(path, json=body)
        if r.status_code != 200:
            return r.status_code, r.text, ""
        data = r.json()
        if call.route == "generate":
            return 200, data["outputs"][0]["text"], data["adapter"]
        choice = data["choices"][0]
        text = choice["message"]["content"] if call.route == "chat" else choice["text"]
        return 200, text, data["mhr"]["adapter"]
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode(), ""
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    if lines[-1] != "data: [DONE]" and call.route != "generate":
        return 599, f"stream did not end with [DONE]: {lines[-1]}", ""
    events = [json.loads(line[len("data: "):]) for line in lines if line != "data: [DONE]"]
    if any("error" in e for e in events):
        return 599, json.dumps(events), ""
    if call.route == "generate":
        return 200, "".join(e["text"] for e in events), r.headers[ADAPTER_HEADER]
    if call.route == "chat":
        return 200, "".join(c["delta"].get("content") or "" for e in events for c in e["choices"]), \
            r.headers[ADAPTER_HEADER]
    return 200, "".join(c["text"] for e in events for c in e["choices"]), r.headers[ADAPTER_HEADER]


async def run_clients(url: str, per_client: list[list[Call]]) -> dict[Call, list[tuple[int, str, str]]]:
    """Every client sends its calls one after another; all clients at once. Returns answers by call."""
    answers: dict[Call, list] = {}
    limits = httpx.Limits(max_connections=len(per_client) + 8, max_keepalive_connections=len(per_client) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        async def one_client(calls: list[Call]) -> None:
            for call in calls:
                answers.setdefault(call, []).append(await send(client, call))

        await asyncio.wait_for(asyncio.gather(*(one_client(c) for c in per_client)), timeout=300)
    return answers


def test_64_clients_on_19_tasks_and_zero_shot_get_the_outputs_of_requests_sent_alone(
        tiny_llama_path, load_bundle_path, tiny_tokenizer):
    per_client = make_calls()
    calls = {c for cs in per_client for c in cs}
    assert {c.task for c in calls} == {*TASKS, *UNKNOWN} and {c.route for c in calls} == {"completions", "chat",
                                                                                          "generate"}
    assert any(c.stream for c in calls) and not all(c.stream for c in calls)
    reference = engine_on(tiny_llama_path, load_bundle_path, tiny_tokenizer, n_slots=24, max_seq_len=64)
    alone = {}  # (prompt ids, task) -> (status, text, adapter) of the request alone in the engine
    for ids, task in sorted({(tuple(c.ids(tiny_tokenizer)), c.task) for c in calls}):
        (result,) = reference.generate([Request(list(ids), task, SamplingParams(max_new_tokens=MAX_TOKENS))])
        alone[ids, task] = (200, result.text, result.adapter)
    expected = {c: alone[tuple(c.ids(tiny_tokenizer)), c.task] for c in calls}
    assert len({text for _, text, _ in alone.values()}) > len(alone) // 2  # tasks differ: the check has teeth
    # 8 slots: the empty one, the pinned zero-shot adapter and 6 for 19 tasks, so the cache evicts
    engine = engine_on(tiny_llama_path, load_bundle_path, tiny_tokenizer, n_slots=8, max_running=32,
                       max_seq_len=64, max_waiting=256)
    with serve_app(create_app(engine)) as url:
        answers = asyncio.run(run_clients(url, per_client))
        assert http.get(f"{url}/health").status_code == 200
        metrics = http.get(f"{url}/metrics").text

    assert sum(len(a) for a in answers.values()) == CLIENTS * REQUESTS_PER_CLIENT
    wrong = {c: (a, expected[c]) for c, got in answers.items() for a in got if a != expected[c]}
    assert not wrong, f"{len(wrong)} calls differ from the request alone, e.g. {next(iter(wrong.items()))}"
    assert {a[2] for got in answers.values() for a in got} == {*TASKS, "zero-shot"}
    stats = engine.stats()
    assert stats.cache.misses >= len(TASKS) and stats.cache.evictions > 0
    assert stats.running == 0 and stats.waiting == 0
    assert "mhr_adapter_cache_evictions_total" in metrics


# ----- backpressure --------------------------------------------------------------------------------

class QueueWatch:
    """Samples the engine's waiting and running counts from a thread while a block runs."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.max_waiting, self.max_running, self.samples = engine, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            s = self.engine.stats()
            self.max_waiting, self.max_running = max(self.max_waiting, s.waiting), max(self.max_running, s.running)
            self.samples += 1

    def __enter__(self) -> QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


async def flood(url: str, n: int) -> list[httpx.Response]:
    """n requests at once (a quarter streamed, some batched), each read to its end."""
    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        async def one(i: int) -> httpx.Response:
            task = TASKS[i % len(TASKS)]
            if i % 4 == 0:
                body = {"model": task, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 12, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    await r.aread()
                return r
            inputs = PROMPTS[:2] if i % 4 == 1 else PROMPTS[i % len(PROMPTS)]
            return await client.post(f"/v1/tasks/{task}/generate", json={"inputs": inputs, "max_new_tokens": 12})

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout=120)


def test_a_full_queue_answers_429_with_retry_after_and_the_server_keeps_serving(
        tiny_llama_path, load_bundle_path, tiny_tokenizer):
    engine = engine_on(tiny_llama_path, load_bundle_path, tiny_tokenizer, n_slots=6, max_running=2,
                       max_waiting=3, max_seq_len=64)
    with serve_app(create_app(engine)) as url:
        with QueueWatch(engine) as watch:
            responses = asyncio.run(flood(url, 96))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(429) > 0 and statuses.count(200) > 0
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                error = r.json()["error"]
                assert error["code"] == "queue_full" and error["type"] == "rate_limit_error" and error["message"]
        assert watch.samples > 0 and watch.max_waiting <= 3 and watch.max_running <= 2
        # nothing left behind, and the server still serves
        stats = engine.stats()
        assert stats.waiting == 0 and stats.running == 0
        after = http.post(f"{url}/v1/completions", json={"model": TASKS[0], "prompt": PROMPTS[0], "max_tokens": 4},
                           timeout=30)
        assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert http.get(f"{url}/health").status_code == 200
        text = http.get(f"{url}/metrics").text
        line = [x for x in text.splitlines() if x.startswith("mhr_rejected_requests_total{reason=\"queue_full\"}")]
        assert line == [f"mhr_rejected_requests_total{{reason=\"queue_full\"}} {float(statuses.count(429))}"]
