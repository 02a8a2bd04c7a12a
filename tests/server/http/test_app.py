"""The HTTP API over real loopback: OpenAI routes (with the real `openai` client), native routes, errors.

References are computed by the engine directly (no HTTP) on an engine of its own; the engine itself is
checked against PEFT in test_engine.py.
"""

from __future__ import annotations

import json

import openai
import pytest

from server.engine.requests import Request, SamplingParams
from server.http.app import ADAPTER_HEADER, create_app
from tests.server import loopback as http
from tests.server.conftest import DENSE, ROUTED
from tests.server.loopback import serve_app

PROMPT = "The quiet river copies the stone"
MAX_TOKENS = 8


def expected_text(engine, tokenizer, task, prompt=PROMPT, max_tokens=MAX_TOKENS):
    ids = tokenizer(prompt).input_ids
    (result,) = engine.generate([Request(ids, task, SamplingParams(max_new_tokens=max_tokens))])
    return result.text, result.adapter


def test_completions_match_the_engine_for_every_kind_of_task(server, client, make_engine, tiny_tokenizer):
    reference = make_engine()
    texts = {}
    for task in [ROUTED[0], ROUTED[3], DENSE, "a-task-nobody-trained"]:
        out = client.completions.create(model=task, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        text, adapter = expected_text(reference, tiny_tokenizer, task)
        assert out.choices[0].text == text
        assert out.model_extra["mhr"]["adapter"] == adapter
        assert out.usage.prompt_tokens == len(tiny_tokenizer(PROMPT).input_ids)
        texts[task] = text
    assert texts["a-task-nobody-trained"] != texts[ROUTED[0]] != texts[DENSE]
    raw = http.post(f"{server}/v1/completions", json={"model": "unseen", "prompt": PROMPT, "max_tokens": 2})
    assert raw.headers[ADAPTER_HEADER] == "zero-shot"


def test_a_batch_of_prompts_gets_one_choice_per_prompt_in_order(client, make_engine, tiny_tokenizer):
    prompts = [PROMPT, "the small red bird", "old house"]
    out = client.completions.create(model=ROUTED[1], prompt=prompts, max_tokens=MAX_TOKENS, temperature=0)
    reference = make_engine()
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [expected_text(reference, tiny_tokenizer, ROUTED[1], p)[0]
                                             for p in prompts]


def test_n_choices_per_prompt_are_seeded_one_apart_and_share_the_prompt_tokens(client, make_engine, tiny_tokenizer):
    prompts = [PROMPT, "old house"]
    out = client.completions.create(model=ROUTED[1], prompt=prompts, max_tokens=MAX_TOKENS, temperature=1.0,
                                    seed=7, n=3)
    reference = make_engine()
    want = [reference.generate([Request(tiny_tokenizer(p).input_ids, ROUTED[1],
                                        SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0, seed=7 + j))])[0]
            for p in prompts for j in range(3)]                     # choices grouped by prompt, in order
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.text for c in out.choices] == [w.text for w in want]
    assert len({c.text for c in out.choices[:3]}) > 1, "sampled choices with different seeds should differ"
    assert out.usage.prompt_tokens == sum(len(tiny_tokenizer(p).input_ids) for p in prompts)   # once a prompt
    assert out.usage.completion_tokens == sum(len(w.tokens) for w in want)
    messages = [{"role": "user", "content": "hello there"}]
    chat = client.chat.completions.create(model=DENSE, messages=messages, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message
    streamed = list(client.chat.completions.create(model=DENSE, messages=messages, max_tokens=4, temperature=0,
                                                   n=2, stream=True))
    for i in (0, 1):
        mine = [c.choices[0].delta for c in streamed if c.choices[0].index == i]
        assert mine[0].role == "assistant" and all(d.role is None for d in mine[1:])
        assert "".join(d.content or "" for d in mine) == chat.choices[i].message.content


def test_logit_bias_and_penalties_shape_the_choice_of_tokens(client, make_engine, tiny_tokenizer):
    forced = client.completions.create(model=ROUTED[0], prompt=PROMPT, max_tokens=5, temperature=0,
                                       logit_bias={"42": 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [tiny_tokenizer.decode([42])] * 5
    ids, reference = tiny_tokenizer(PROMPT).input_ids, make_engine()
    (plain,) = reference.generate([Request(ids, ROUTED[0], SamplingParams(max_new_tokens=MAX_TOKENS))])
    banned = plain.tokens[0]                                   # the unshaped first token, banned
    shaped = client.completions.create(model=ROUTED[0], prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                       frequency_penalty=2, presence_penalty=0.5, logit_bias={str(banned): -100})
    params = SamplingParams(max_new_tokens=MAX_TOKENS, frequency_penalty=2, presence_penalty=0.5,
                            logit_bias=((banned, -100.0),))
    (want,) = reference.generate([Request(ids, ROUTED[0], params)])
    assert shaped.choices[0].text == want.text and banned not in want.tokens and want.tokens != plain.tokens


def test_streaming_gives_the_same_text_and_ends_with_done(server, client):
    task = ROUTED[2]
    whole = client.completions.create(model=task, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.completions.create(model=task, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with http.stream("POST", f"{server}/v1/completions",
                      json={"model": task, "prompt": PROMPT, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_completions_plain_and_streamed(client, tiny_tokenizer, make_engine):
    messages = [{"role": "user", "content": "hello there"}]
    out = client.chat.completions.create(model=DENSE, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    (expected,) = make_engine().generate([Request(ids, DENSE, SamplingParams(max_new_tokens=MAX_TOKENS))])
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].message.role == "assistant"
    streamed = list(client.chat.completions.create(model=DENSE, messages=messages, max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected.text
    assert streamed[0].choices[0].delta.role == "assistant"
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_models_lists_every_task_and_the_zero_shot_adapter_with_the_backbone_as_parent(client, bundle_path):
    models = client.models.list().data
    ids = [m.id for m in models]
    assert ids == [*ROUTED, DENSE, "zero-shot"]
    assert {m.model_extra["parent"] for m in models} == {models[0].model_extra["root"]}


def test_native_routes(server, make_engine, tiny_tokenizer):
    reference = make_engine()
    r = http.post(f"{server}/v1/tasks/{ROUTED[4]}/generate",
                   json={"inputs": [PROMPT, "old house"], "max_new_tokens": MAX_TOKENS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == ROUTED[4] and r.headers[ADAPTER_HEADER] == ROUTED[4]
    assert [o["text"] for o in body["outputs"]] == [expected_text(reference, tiny_tokenizer, ROUTED[4], p)[0]
                                                    for p in (PROMPT, "old house")]
    tasks = http.get(f"{server}/v1/tasks").json()
    assert [t["name"] for t in tasks["tasks"]] == [*ROUTED, DENSE] and tasks["zero_shot"] == "zero-shot"
    info = http.get(f"{server}/v1/tasks/{ROUTED[0]}").json()
    assert info["kind"] == "routed" and len(info["routing"]) == 2 and len(info["routing"][0]) == 4
    assert all(abs(sum(head) - 1) < 1e-3 for head in info["routing"])  # weights normalised per head
    assert http.get(f"{server}/v1/tasks/{DENSE}").json()["kind"] == "dense"
    assert http.get(f"{server}/v1/tasks/nope").status_code == 404


def test_zero_shot_fallback_off_answers_404(make_engine):
    with serve_app(create_app(make_engine(allow_zero_shot=False))) as url:
        r = http.post(f"{url}/v1/completions", json={"model": "unseen", "prompt": PROMPT})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "zero-shot" not in [m["id"] for m in http.get(f"{url}/v1/models").json()["data"]]
        ok = http.post(f"{url}/v1/completions", json={"model": ROUTED[0], "prompt": PROMPT, "max_tokens": 2})
        assert ok.status_code == 200


@pytest.mark.parametrize("body, status, says", [
    ({"model": ROUTED[0], "prompt": [PROMPT] * 33, "n": 2}, 400, "times 'n'"),
    ({"model": ROUTED[0], "prompt": PROMPT, "n": 0}, 400, "n"),
    ({"model": ROUTED[0], "prompt": PROMPT, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": ROUTED[0], "prompt": PROMPT, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"model": ROUTED[0], "prompt": PROMPT, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": ROUTED[0], "prompt": PROMPT, "logit_bias": {str(t): 1 for t in range(301)}}, 400, "at most 300"),
    ({"model": ROUTED[0], "prompt": PROMPT, "logit_bias": {"1000000": 1}}, 400, "token ids must be in"),
    ({"model": ROUTED[0], "prompt": PROMPT, "logprobs": 21}, 400, "logprobs"),
    ({"model": ROUTED[0], "prompt": PROMPT, "suffix": "and then"}, 400, "suffix"),
    ({"model": ROUTED[0], "prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": ROUTED[0], "prompt": PROMPT, "max_tokens": 10**9}, 400, "context limit"),
    ({"model": ROUTED[0], "prompt": PROMPT * 40}, 400, "context limit"),
    ({"model": ROUTED[0], "prompt": ""}, 400, "must not be empty"),
    ({"model": ROUTED[0], "prompt": [10**9]}, 400, "token ids"),
    ({"model": ROUTED[0], "prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ({"model": ROUTED[0], "prompt": PROMPT, "bogus": 1}, 400, "bogus"),
    ({"model": "../etc/passwd", "prompt": PROMPT}, 400, "invalid task name"),
    ({"model": "x" * 200, "prompt": PROMPT}, 400, "invalid task name"),
    ({"model": "tâche", "prompt": PROMPT}, 400, "invalid task name"),
    ({"prompt": PROMPT}, 400, "model"),
])
def test_bad_requests_get_a_400_that_says_what_to_fix(server, body, status, says):
    r = http.post(f"{server}/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert http.get(f"{server}/health").status_code == 200


def test_malformed_json_and_unknown_routes_use_the_error_body(server):
    r = http.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http.post(f"{server}/v1/completions", content=b"model=x&prompt=y",
                  headers={"content-type": "application/x-www-form-urlencoded"})   # curl -d without a JSON type
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"], r.text
    r = http.get(f"{server}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_api_key_guards_inference_routes_but_not_health(make_engine):
    with serve_app(create_app(make_engine(), api_key="s3cret")) as url:
        body = {"model": ROUTED[0], "prompt": PROMPT, "max_tokens": 2}
        assert http.post(f"{url}/v1/completions", json=body).status_code == 401
        wrong = http.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        ok = http.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret").models.list().data
        assert http.get(f"{url}/health").status_code == 200 and http.get(f"{url}/ready").status_code == 200


def test_metrics_count_requests_and_tokens_by_adapter(server, client):
    client.completions.create(model=ROUTED[0], prompt=PROMPT, max_tokens=4, temperature=0)
    client.completions.create(model="unseen-task", prompt=PROMPT, max_tokens=4, temperature=0)
    http.post(f"{server}/v1/completions", json={"model": ROUTED[0], "prompt": PROMPT, "best_of": 3})
    text = http.get(f"{server}/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}

    def finished(adapter):  # over finish reasons: a request may end at EOS or at max_tokens
        return sum(v for k, v in samples.items() if k.startswith(f'mhr_requests_total{{adapter="{adapter}"'))

    assert finished(ROUTED[0]) >= 1 and finished("zero-shot") >= 1
    assert samples[f'mhr_generated_tokens_total{{adapter="{ROUTED[0]}"}}'] >= 4
    assert samples['mhr_rejected_requests_total{reason="invalid_request"}'] >= 1
    assert samples["mhr_adapter_cache_misses_total"] >= 1
    assert samples["mhr_time_to_first_token_seconds_count"] >= 2
    assert samples["mhr_time_per_output_token_seconds_count"] >= 1  # requests of two tokens or more
    assert "unseen-task" not in text  # labels name adapters, never raw model names


def test_stream_json_lines_parse(server):
    with http.stream("POST", f"{server}/v1/tasks/{ROUTED[0]}/generate",
                      json={"inputs": PROMPT, "max_new_tokens": 4, "stream": True}) as r:
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert events[-1]["finish_reason"] in ("length", "stop") and all(e["adapter"] == ROUTED[0] for e in events)
