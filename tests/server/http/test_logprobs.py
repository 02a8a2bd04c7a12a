"""Log-probabilities over HTTP with the real `openai` client: completions (generated tokens, an echoed and
scored prompt, streamed), chat (plain and streamed), and the refusals. Values are the engine's own for the
same request (the engine is checked against PEFT in test_logprobs.py); this checks their OpenAI shapes."""

from __future__ import annotations

import pytest

from server.engine.requests import Request, SamplingParams
from tests.server import loopback as http
from tests.server.conftest import DENSE, ROUTED

PROMPT = "The quiet river copies the stone"


@pytest.fixture
def reference(make_engine):
    return make_engine()


def engine_result(engine, ids, task, **params):
    (result,) = engine.generate([Request(ids, task, SamplingParams(**params))])
    return result


def text_of(tokenizer, token):
    return tokenizer.decode([token])


def test_completion_logprobs_are_the_engines_per_generated_token(client, reference, tiny_tokenizer):
    out = client.completions.create(model=ROUTED[0], prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    want = engine_result(reference, tiny_tokenizer(PROMPT).input_ids, ROUTED[0], max_new_tokens=6, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.tokens == [text_of(tiny_tokenizer, t) for t in want.tokens]
    assert lp.token_logprobs == pytest.approx([p.logprob for p in want.logprobs], abs=1e-6)
    assert lp.top_logprobs == [pytest.approx({text_of(tiny_tokenizer, t): v for t, v in p.top}, abs=1e-6)
                               for p in want.logprobs]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert out.choices[0].text == want.text and out.usage.completion_tokens == len(want.tokens)


def test_an_echoed_prompt_is_scored_without_generating(client, reference, tiny_tokenizer):
    """The scoring call of evaluation harnesses: echo, max_tokens 0, logprobs."""
    ids = tiny_tokenizer(PROMPT).input_ids
    out = client.completions.create(model=DENSE, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    want = engine_result(reference, ids, DENSE, max_new_tokens=0, prompt_logprobs=1)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [text_of(tiny_tokenizer, t) for t in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([p.logprob for p in want.prompt_logprobs[1:]],
                                                               abs=1e-6)
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])
    both = client.completions.create(model=DENSE, prompt=[ids], max_tokens=3, echo=True, logprobs=0,
                                     temperature=0)
    choice = both.choices[0]
    assert choice.text.startswith(tiny_tokenizer.decode(ids)) and len(choice.logprobs.tokens) == len(ids) + 3
    assert choice.logprobs.token_logprobs[1:len(ids)] == pytest.approx(
        [p.logprob for p in want.prompt_logprobs[1:]], abs=1e-6)
    plain = client.completions.create(model=DENSE, prompt=PROMPT, max_tokens=2, echo=True, temperature=0)
    assert plain.choices[0].text.startswith(PROMPT) and plain.choices[0].logprobs is None


def test_streamed_completion_logprobs_equal_the_whole_response(client):
    args = dict(model=ROUTED[3], prompt=PROMPT, max_tokens=7, temperature=0, logprobs=3)
    whole = client.completions.create(**args).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(**args, stream=True) if c.choices]
    streamed = [lp for lp in chunks if lp is not None]
    assert [t for lp in streamed for t in lp.tokens] == whole.tokens
    assert [v for lp in streamed for v in lp.token_logprobs] == whole.token_logprobs
    assert [d for lp in streamed for d in lp.top_logprobs] == whole.top_logprobs
    assert [o for lp in streamed for o in lp.text_offset] == whole.text_offset


@pytest.mark.parametrize("args", [dict(max_tokens=0, logprobs=1), dict(max_tokens=4, logprobs=0),
                                  dict(max_tokens=3), dict(max_tokens=2, logprobs=2, n=2, prompt=[PROMPT, "stone"])])
def test_a_streamed_echo_equals_the_whole_response(client, args):
    """The prompt comes back with each choice's first chunk (its log-probabilities too, when asked): the
    chunks of a choice put together are the whole response's choice."""
    args = dict(model=DENSE, prompt=PROMPT, echo=True, temperature=0) | args
    whole = client.completions.create(**args).choices
    chunks = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
    for choice in whole:
        mine = [c for c in chunks if c.index == choice.index]
        assert "".join(c.text for c in mine) == choice.text and mine[-1].finish_reason == choice.finish_reason
        if choice.logprobs is None:
            assert all(c.logprobs is None for c in mine)
            continue
        streamed = [c.logprobs for c in mine if c.logprobs is not None]
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [v for lp in streamed for v in getattr(lp, field)] == getattr(choice.logprobs, field)


def test_chat_logprobs_plain_and_streamed(client, reference, tiny_tokenizer):
    messages = [{"role": "user", "content": "hello there"}]
    args = dict(model=ROUTED[1], messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    out = client.chat.completions.create(**args)
    ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = engine_result(reference, ids, ROUTED[1], max_new_tokens=5, logprobs=2)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [text_of(tiny_tokenizer, t) for t in want.tokens]
    assert [c.logprob for c in content] == pytest.approx([p.logprob for p in want.logprobs], abs=1e-6)
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2 for c in content)
    assert [t.logprob for c in content for t in c.top_logprobs] == pytest.approx(
        [v for p in want.logprobs for _, v in p.top], abs=1e-6)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(**args, stream=True)]
    assert [e for lp in streamed if lp is not None for e in lp.content] == content
    without = client.chat.completions.create(model=ROUTED[1], messages=messages, max_tokens=2, temperature=0)
    assert without.choices[0].logprobs is None


@pytest.mark.parametrize("route, body, says", [
    ("chat/completions", {"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
])
def test_bad_logprob_requests_get_a_400(server, route, body, says):
    base = ({"messages": [{"role": "user", "content": "hi"}]} if route.startswith("chat") else {"prompt": PROMPT})
    r = http.post(f"{server}/v1/{route}", json={"model": ROUTED[0], **base, **body})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
