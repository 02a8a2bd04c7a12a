"""Property-based fuzzing of every POST route over real HTTP: random JSON, random bytes, random task paths.

Whatever arrives, the server answers without a 5xx, every 4xx carries OpenAI's error body, and it keeps
answering /health. Bodies mix the real field names (with right and wrong types) with random ones; values
that would pass validation are kept small so valid requests generate only a few tokens. One server
serves the whole run; hypothesis is derandomized so CI sees the same examples every time.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

import mhr
from server.config import ServerConfig
from server.engine.core import Engine
from server.http.app import create_app
from tests.server.conftest import DENSE, ROUTED
from tests.server.loopback import serve_app

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ----- strategies --------------------------------------------------------------------------------

HUGE = st.sampled_from([2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**30, 1e308, -1e308, 1e-320, 10**400])
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-3, max_value=4) | HUGE
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)

GOOD_TASKS = st.sampled_from([*ROUTED, DENSE, "unseen-task"])
TASK_NAMES = GOOD_TASKS | GOOD_TASKS | st.sampled_from(["../etc/passwd", "x" * 300, "tâche", "", " ", "a/b",
                                                        "%2e%2e", "\u202etask", "task\x00"]) | st.text(max_size=20)
SMALL_TOKENS = st.integers(min_value=1, max_value=3)  # valid lengths stay short
PROMPT_TEXT = st.sampled_from(["hello", "The quiet river copies the stone", "ünïcödé ✓ 🚀"]) | st.text(max_size=30)
TOKEN_IDS = st.lists(st.integers(min_value=-5, max_value=500), min_size=0, max_size=6)
ROLES = st.sampled_from(["user", "system", "assistant", "developer", "tool", "robot", ""])
MESSAGE = st.fixed_dictionaries({"role": ROLES | JSON, "content": PROMPT_TEXT | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | JSON, "text": PROMPT_TEXT | JSON}),
    max_size=2) | JSON}, optional={"name": st.text(max_size=80) | JSON})
MIX = st.one_of(
    st.fixed_dictionaries({"mix": st.dictionaries(TASK_NAMES, st.floats(min_value=-1, max_value=2), max_size=3)}),
    st.fixed_dictionaries({"skills": st.lists(st.lists(st.floats(min_value=-1, max_value=2), max_size=5),
                                              max_size=3)}),
    st.fixed_dictionaries({"skills": st.lists(st.lists(st.floats(min_value=0, max_value=2), min_size=4, max_size=4),
                                              min_size=2, max_size=2)}),  # the bundle's shape: 2 heads, 4 skills
    st.fixed_dictionaries({}, optional={"mix": JSON, "skills": JSON, "bogus": JSON}))

# Plausible values per field: mostly valid, with edge cases (out of range, unsupported) among them.
SAMPLING = {
    "temperature": st.sampled_from([0, 0.0, 0, 0.7, 2, 2.5, -1]),
    "top_p": st.sampled_from([1, 0.9, 1.0, 0, 1.5]),
    "stop": st.sampled_from(["\n", ["a", "b"], [], None, [""], ["a"] * 5]) | st.text(max_size=3),
    "seed": st.integers(min_value=-1, max_value=2**64) | st.none(),
    "mhr": MIX | st.none(),
}
OPENAI = SAMPLING | {
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}) | st.none(),
    "n": st.sampled_from([1, 1, 2, None]),
    "logprobs": st.sampled_from([None, False, True, 0, 3, 21]),
    "user": st.text(max_size=300),
    "presence_penalty": st.sampled_from([0, 0.0, 0.5, None, 2.5]),
    "frequency_penalty": st.sampled_from([0, 1.5, -2, None, float("nan")]),
    "logit_bias": st.sampled_from([{}, None, {"5": 1.0}, {"5": 100}, {"x": 1}, {"99999999": 1.0}]),
}
COMPLETION = OPENAI | {
    "model": TASK_NAMES,
    "prompt": PROMPT_TEXT | TOKEN_IDS | st.lists(PROMPT_TEXT, max_size=3) | st.lists(TOKEN_IDS, max_size=2),
    "max_tokens": SMALL_TOKENS | st.sampled_from([0, -1, 10**9, None]),
    "echo": st.booleans(),
    "suffix": st.none() | st.text(max_size=3),
    "best_of": st.sampled_from([1, 2, None]),
}
CHAT = OPENAI | {
    "model": TASK_NAMES,
    "messages": st.lists(MESSAGE, min_size=1, max_size=3) | st.just([]),
    "max_tokens": SMALL_TOKENS | st.sampled_from([0, 10**9]),
    "max_completion_tokens": SMALL_TOKENS | st.none(),
    "top_logprobs": st.sampled_from([None, 0, 2, 21]),
    "tools": st.sampled_from([[], None, [{"type": "function"}]]),
    "tool_choice": st.sampled_from(["none", "auto", None]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, None]),
}
GENERATE = SAMPLING | {
    "inputs": PROMPT_TEXT | st.lists(PROMPT_TEXT, max_size=3),
    "max_new_tokens": SMALL_TOKENS | st.sampled_from([0, 10**9]),
    "stream": st.booleans(),
}


@st.composite
def body_of(draw, fields: dict[str, st.SearchStrategy], required: tuple[str, ...], length: str) -> dict:
    """A request body: plausible values for the required fields and up to 3 others, then 0-3 corruptions
    (a field set to any JSON, a field dropped, a random key added). With no corruption most bodies are
    valid and reach tokenizing, the context check and the engine; the length defaults to 1 so they stay short.
    """
    chosen = [*required, *draw(st.sets(st.sampled_from(sorted(set(fields) - set(required))), max_size=3))]
    body = {k: draw(fields[k]) for k in chosen}
    body.setdefault(length, 1)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        how = draw(st.sampled_from(["junk", "drop", "extra"]))
        if how == "extra":
            body[draw(st.text(max_size=10))] = draw(JSON)
        elif body:
            key = draw(st.sampled_from(sorted(body)))
            if how == "drop":
                del body[key]
            elif key != length:  # junk lengths come from JSON's small or huge integers anyway
                body[key] = draw(JSON)
    return body


ROUTES = st.one_of(
    st.tuples(st.just("/v1/completions"), body_of(COMPLETION, ("model", "prompt"), "max_tokens")),
    st.tuples(st.just("/v1/chat/completions"), body_of(CHAT, ("model", "messages"), "max_tokens")),
    st.tuples(st.builds(lambda t: f"/v1/tasks/{quote(t, safe='')}/generate", TASK_NAMES),
              body_of(GENERATE, ("inputs",), "max_new_tokens")),
)
POST_PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions", f"/v1/tasks/{ROUTED[0]}/generate",
                              "/v1/tasks/unseen/generate"])

# ----- the server and the checks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_llama_path, bundle_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    config = ServerConfig(n_slots=8, max_seq_len=48, max_running=8, max_waiting=64)
    engine = Engine(model, mhr.Bundle.load(bundle_path), config, AutoTokenizer.from_pretrained(tiny_llama_path))
    with serve_app(create_app(engine)) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c
        assert c.get("/health").status_code == 200


def check(r: httpx.Response, body: bytes) -> None:
    """No 5xx; a 4xx carries OpenAI's error body; a 2xx is JSON or an SSE stream that ends properly."""
    assert r.status_code < 500, f"{r.status_code} {body!r}: {r.text}"
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in r.text.splitlines() if line]
        assert lines and all(line.startswith("data: ") for line in lines), r.text
        events = [json.loads(line[len("data: "):]) for line in lines if line != "data: [DONE]"]
        assert not any("error" in e for e in events), r.text
    else:
        assert isinstance(r.json(), dict)


def post(client: httpx.Client, path: str, content: bytes, content_type: str | None = "application/json"):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(path, content=content, headers=headers)
    check(r, content)
    event(f"{path.split('/')[2]} -> {r.status_code} {r.json()['error']['code'] if r.status_code >= 400 else ''}")
    return r


@FUZZ
@given(route=ROUTES)
def test_random_json_bodies_never_get_a_5xx(client, route):
    path, body = route
    post(client, path, json.dumps(body).encode())  # NaN and Infinity too, as Python's json writes them
    assert client.get("/health").status_code == 200


@FUZZ
@given(path=POST_PATHS, body=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()),
       content_type=st.sampled_from(["application/json", "text/plain", None, "application/x-www-form-urlencoded"]))
def test_random_bytes_and_bare_json_values_never_get_a_5xx(client, path, body, content_type):
    post(client, path, body, content_type)


@FUZZ
@given(task=st.text(max_size=40) | TASK_NAMES, body=JSON)
def test_random_task_paths_never_get_a_5xx(client, task, body):
    post(client, f"/v1/tasks/{quote(task, safe='')}/generate",
         json.dumps({"inputs": "hello", "max_new_tokens": 1} if body is None else body).encode())
    post(client, f"/v1/tasks/{quote(task, safe='')}/generate", b'{"inputs": "hi", "max_new_tokens": 1}')
    assert client.get(f"/v1/tasks/{quote(task, safe='')}").status_code < 500
