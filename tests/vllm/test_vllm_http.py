"""The HTTP API over the vLLM engine, on real loopback: completions (plain and streamed), /metrics, and the
slot resize it refuses (vLLM's adapter count is fixed at start)."""

from __future__ import annotations

import json

import httpx
import pytest

from server.engine.requests import Request, SamplingParams
from server.http.app import ADAPTER_HEADER, create_app
from tests.server import loopback as http
from tests.server.conftest import DENSE, ROUTED
from tests.server.loopback import serve_app

pytest.importorskip("vllm")

PROMPT = "The quiet river copies the stone"


def test_completions_and_metrics_over_the_vllm_engine(vllm_engine, make_torch_engine, tiny_tokenizer):
    reference = make_torch_engine()
    ids = tiny_tokenizer(PROMPT).input_ids
    with serve_app(create_app(vllm_engine, admin_key="vllm-admin-key")) as url:
        for task in [ROUTED[0], DENSE, "a-task-nobody-trained"]:
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": task, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            (want,) = reference.generate([Request(ids, task, SamplingParams(max_new_tokens=8))])
            body = r.json()
            assert body["choices"][0]["text"] == want.text
            assert body["mhr"]["adapter"] == r.headers[ADAPTER_HEADER] == want.adapter
            assert body["usage"]["prompt_tokens"] == len(ids)

        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"model": ROUTED[0], "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                "stream": True}) as r:
            chunks = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        (want,) = reference.generate([Request(ids, ROUTED[0], SamplingParams(max_new_tokens=8))])
        assert "".join(c["choices"][0]["text"] for c in chunks) == want.text

        r = http.put(f"{url}/admin/slots", headers={"Authorization": "Bearer vllm-admin-key"}, json={"n_slots": 9})
        assert r.status_code == 400 and r.json()["error"]["code"] == "not_supported", r.text

        models = {m["id"] for m in http.get(f"{url}/v1/models").json()["data"]}
        assert {*ROUTED, DENSE, "zero-shot"} <= models
        text = http.get(f"{url}/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert sum(v for k, v in samples.items() if k.startswith(f'mhr_requests_total{{adapter="{ROUTED[0]}"')) >= 2
    assert samples[f'mhr_generated_tokens_total{{adapter="{DENSE}"}}'] >= 1
    assert samples["mhr_adapter_cache_hits_total"] + samples["mhr_adapter_cache_misses_total"] >= 4
    assert samples["mhr_engine_steps_total"] >= 8 and samples["mhr_adapter_slots"] == vllm_engine.adapters.capacity
    assert samples["mhr_time_to_first_token_seconds_count"] >= 4
