"""Log-probabilities from the engine: generated and prompt tokens equal PEFT's log-softmax (prefilled whole or
in chunks), are the same in any batch, are the model's distribution before temperature, and a prompt can be
scored without generating."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import mhr
from server.engine.requests import Request, SamplingParams
from tests.server.conftest import DENSE, ROUTED
from tests.server.engine.test_core import mixed_requests, prompt, run_alone

SCORED = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)


def peft_logprobs(model_path, lora, tmp_path, ids):
    """log-softmax of PEFT's logits over `ids` [len(ids), V]: row i is the distribution of token i + 1."""
    peft_dir = mhr.export_peft(lora, tmp_path / "peft", base_model_name_or_path=str(model_path))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                      peft_dir).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


def assert_matches(logprob, want_row, token, top):
    assert logprob.token == token and logprob.logprob == pytest.approx(want_row[token].item(), abs=1e-4)
    values, ids = want_row.topk(top)
    assert [t for t, _ in logprob.top] == ids.tolist()
    assert [v for _, v in logprob.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # the dense LoRA covers half the modules
@pytest.mark.parametrize("task", [ROUTED[1], DENSE])
@pytest.mark.parametrize("max_prefill_tokens", [2048, 3])  # 3: the prompt prefilled (and scored) in chunks
def test_logprobs_equal_peft(task, max_prefill_tokens, make_engine, tiny_llama_path, tiny_tokenizer, tmp_path):
    engine = make_engine(max_prefill_tokens=max_prefill_tokens)
    lora = engine.tasks.bundle.task_lora(task)
    ids = prompt(tiny_tokenizer, 9, 2)
    (result,) = engine.generate([Request(ids, task, SCORED)])
    want = peft_logprobs(tiny_llama_path, lora, tmp_path, ids + result.tokens)
    n = len(ids)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == n
    for i in range(1, n):
        assert_matches(result.prompt_logprobs[i], want[i - 1], ids[i], 2)
    assert len(result.logprobs) == len(result.tokens) == SCORED.max_new_tokens
    for j, (logprob, token) in enumerate(zip(result.logprobs, result.tokens, strict=True)):
        assert_matches(logprob, want[n - 1 + j], token, 3)


def flat(logprobs):
    """(token, log-probability) pairs of a list of TokenLogprobs (None for the first prompt token: skipped)."""
    return [(p.token, p.logprob) for p in logprobs if p is not None]


def test_logprobs_do_not_depend_on_the_batch(make_engine, tiny_tokenizer):
    """The same tokens, and log-probabilities equal to float rounding: a decode step's attention sums over the
    batch's longest sequence (masked positions add exact zeros, in another order)."""
    requests = [Request(r.prompt, r.task, SCORED) for r in mixed_requests(tiny_tokenizer)]
    alone = run_alone(make_engine(), requests)
    together = make_engine().generate(requests)
    chunked = make_engine(max_prefill_tokens=5).generate(requests)  # long prompts in chunks
    for a, b, c in zip(alone, together, chunked, strict=True):
        assert a.tokens == b.tokens == c.tokens
        for x in (b, c):
            for mine, other in ((a.logprobs, x.logprobs), (a.prompt_logprobs, x.prompt_logprobs)):
                assert [t for t, _ in flat(mine)] == [t for t, _ in flat(other)]
                assert [v for _, v in flat(mine)] == pytest.approx([v for _, v in flat(other)], abs=1e-5)
                assert [[t for t, _ in p.top] for p in mine if p] == [[t for t, _ in p.top] for p in other if p]
    assert len({tuple(flat(r.logprobs)) for r in together}) >= 8, "adapters should change the log-probabilities"


def test_logprobs_are_the_models_distribution_before_temperature(make_engine, tiny_tokenizer):
    engine = make_engine()
    ids = prompt(tiny_tokenizer, 6)
    greedy, sampled = engine.generate([
        Request(ids, ROUTED[0], SamplingParams(max_new_tokens=1, logprobs=5)),
        Request(ids, ROUTED[0], SamplingParams(max_new_tokens=1, logprobs=5, temperature=1.7, seed=3))])
    assert greedy.logprobs[0].top == sampled.logprobs[0].top
    first = dict(sampled.logprobs[0].top)
    assert greedy.logprobs[0].logprob == first[greedy.tokens[0]] == max(first.values())
    plain = engine.generate([Request(ids, ROUTED[0], SamplingParams(max_new_tokens=1))])[0]
    assert plain.logprobs is None and plain.prompt_logprobs is None  # not asked: not computed


def test_a_prompt_is_scored_without_generating(make_engine, tiny_tokenizer):
    engine = make_engine(max_prefill_tokens=4)
    ids = prompt(tiny_tokenizer, 8)
    scored = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
    events = []
    handle = engine.submit(Request(ids, ROUTED[2], scored), events.append)
    generated = engine.submit(Request(ids, ROUTED[2], SCORED))
    while engine.has_work:
        engine.step()
    result, reference = handle.result(), generated.result()
    assert result.tokens == [] and result.finish_reason == "length" and result.logprobs is None
    assert result.prompt_logprobs[0] is None and flat(result.prompt_logprobs) == flat(reference.prompt_logprobs)
    assert all(p.top == () for p in result.prompt_logprobs[1:])
    assert [(e.token, e.finish_reason) for e in events] == [(None, "length")]
    assert engine.kv.n_active == 0 and not engine.batch and engine.stats().running == 0
    assert engine.cache.refs(engine.cache.slot_of(engine.tasks.resolve(ROUTED[2]))) == 0
