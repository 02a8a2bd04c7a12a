"""Text that no tokenizer can encode, malformed JSON, unknown failures: each a clear 4xx naming the field, or a 500
that carries a request id and nothing of the server's internals. The API schema is off by default and never
open without the key."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoTokenizer

from server.http.app import create_app
from tests.server import loopback as http
from tests.server.admin_helpers import API_KEY, engine_on
from tests.server.loopback import serve_app

KEY = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
LONE = '"kab\\ud800adu"'  # JSON's escape of a lone surrogate: valid JSON, not valid Unicode

CASES = {
    "completion prompt": ("/v1/completions", f'{{"model": "task0", "prompt": {LONE}}}', "prompt"),
    "completion prompt list": ("/v1/completions", f'{{"model": "task0", "prompt": ["ok", {LONE}]}}', "prompt"),
    "stop": ("/v1/completions", f'{{"model": "task0", "prompt": "ok", "stop": {LONE}}}', "stop"),
    "user": ("/v1/completions", f'{{"model": "task0", "prompt": "ok", "user": {LONE}}}', "user"),
    "model": ("/v1/completions", f'{{"model": {LONE}, "prompt": "ok"}}', "model"),
    "mix": ("/v1/completions", f'{{"model": "task0", "prompt": "ok", "mhr": {{"mix": {{{LONE}: 1}}}}}}', "mhr.mix"),
    "chat message": ("/v1/chat/completions",
                     f'{{"model": "task0", "messages": [{{"role": "user", "content": {LONE}}}]}}', "messages"),
    "chat part": ("/v1/chat/completions", '{"model": "task0", "messages": [{"role": "user", "content": '
                                          f'[{{"type": "text", "text": {LONE}}}]}}]}}', "messages"),
    "generate input": ("/v1/tasks/task0/generate", f'{{"inputs": {LONE}}}', "inputs"),
    "generate inputs": ("/v1/tasks/task0/generate", f'{{"inputs": ["ok", {LONE}]}}', "inputs"),
}


@pytest.fixture(scope="module")
def server(make_engine_module):
    with serve_app(create_app(make_engine_module(), api_key=API_KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def make_engine_module(tiny_llama_path, bundle_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    return lambda **overrides: engine_on(tiny_llama_path, tokenizer, bundle_path, **overrides)


@pytest.mark.parametrize("case", list(CASES))
def test_a_lone_surrogate_gets_a_400_naming_the_field(server, case, caplog):
    path, body, field = CASES[case]
    with caplog.at_level(logging.ERROR):
        r = http.post(f"{server}{path}", content=body.encode(), headers=KEY)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(field) and "surrogate" in error["message"].lower(), error
    assert "Traceback" not in caplog.text
    assert http.post(f"{server}/v1/completions", json={"model": "task0", "prompt": "ok", "max_tokens": 1},
                     headers=KEY).status_code == 200


def test_malformed_json_names_its_position_in_the_message_not_as_a_field(server):
    r = http.post(f"{server}/v1/completions", content=b'{"model": "task0", "prompt": }', headers=KEY)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] is None and "at character 29" in error["message"], error


def test_an_unexpected_error_answers_500_with_a_request_id_and_logs_the_details(make_engine_module, caplog):
    app = create_app(make_engine_module())

    @app.get("/v1/boom")
    async def boom():
        raise RuntimeError("secret detail at /srv/bundles/x")

    with serve_app(app) as url, caplog.at_level(logging.ERROR):
        r = http.get(f"{url}/v1/boom")
    assert r.status_code == 500
    message, request_id = r.json()["error"]["message"], r.headers["x-request-id"]
    assert request_id in message and "secret" not in r.text and "RuntimeError" not in r.text, r.text
    assert request_id in caplog.text and "secret detail" in caplog.text


def test_every_response_carries_a_request_id(server):
    ids = {http.get(f"{server}/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)


def test_the_api_schema_and_docs_pages_are_off_by_default(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert http.get(f"{server}{path}", headers=KEY).status_code == 404, path


def test_the_api_schema_when_asked_for_is_behind_the_key_without_admin_routes(make_engine_module, tmp_path,
                                                                             bundle_path):
    from server.http.deploy import Deployer

    app = create_app(make_engine_module(), api_key=API_KEY, admin_key="admin-key-0123456789", api_docs=True,
                     deployer=Deployer(None, bundle_path, 2**20))
    with serve_app(app) as url:
        assert http.get(f"{url}/openapi.json").status_code == 401
        r = http.get(f"{url}/openapi.json", headers=KEY)
        assert r.status_code == 200 and "/v1/completions" in r.json()["paths"]
        assert not [p for p in r.json()["paths"] if p.startswith("/admin")]
        for page in ("/docs", "/redoc"):  # no page that would load its scripts from a CDN
            assert http.get(f"{url}{page}", headers=KEY).status_code == 404
