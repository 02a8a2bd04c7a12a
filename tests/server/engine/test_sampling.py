"""Logit biases and presence / frequency penalties: greedy tokens equal PEFT's `generate` with an independent
logits processor, each request shaped by its own settings in a mixed batch, bad settings refused."""

from collections import Counter

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

import mhr
from server.engine.requests import InvalidRequest, Request, SamplingParams
from tests.server.conftest import DENSE, ROUTED
from tests.server.engine.test_core import mixed_requests, prompt, run_alone


class OpenAIShaping(LogitsProcessor):
    """OpenAI's rules, written out: add each bias; for every token generated so far, subtract the presence
    penalty once and the frequency penalty once per occurrence."""

    def __init__(self, prompt_len, presence, frequency, bias):
        self.prompt_len, self.presence, self.frequency, self.bias = prompt_len, presence, frequency, bias

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for token, bias in self.bias.items():
            scores[0, token] += bias
        for token, count in Counter(input_ids[0, self.prompt_len:].tolist()).items():
            scores[0, token] -= self.presence + self.frequency * count
        return scores


def peft_shaped(model_path, lora, tmp_path, ids, max_new_tokens, presence, frequency, bias):
    peft_dir = mhr.export_peft(lora, tmp_path / "peft", base_model_name_or_path=str(model_path))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                      peft_dir).eval()
    shaping = LogitsProcessorList([OpenAIShaping(len(ids), presence, frequency, bias)])
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         logits_processor=shaping)
    return out[0, len(ids):].tolist()


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # the dense LoRA covers half the modules
@pytest.mark.parametrize("task", [ROUTED[2], DENSE])
def test_shaped_tokens_equal_peft_with_openai_rules(task, make_engine, tiny_llama_path, tiny_tokenizer, tmp_path):
    engine = make_engine()
    ids = prompt(tiny_tokenizer, 6, 1)
    plain = engine.generate([Request(ids, task, SamplingParams(max_new_tokens=14, ignore_eos=True))])[0].tokens
    bias = {plain[0]: -100.0, 7: 2.5}
    params = SamplingParams(max_new_tokens=14, ignore_eos=True, presence_penalty=0.5, frequency_penalty=1.5,
                            logit_bias=tuple(bias.items()))
    (result,) = engine.generate([Request(ids, task, params)])
    lora = engine.tasks.bundle.task_lora(task)
    assert result.tokens == peft_shaped(tiny_llama_path, lora, tmp_path, ids, 14, 0.5, 1.5, bias)
    assert result.tokens != plain and plain[0] not in result.tokens


def test_each_request_is_shaped_by_its_own_settings_in_a_mixed_batch(make_engine, tiny_tokenizer):
    shapes = [dict(), dict(frequency_penalty=2.0), dict(presence_penalty=-1.0), dict(logit_bias=((9, 100.0),)),
              dict(frequency_penalty=0.7, logit_bias=((11, -5.0), (12, 4.0))), dict(temperature=0.8, seed=5,
                                                                                     presence_penalty=1.0)]
    requests = [Request(r.prompt, r.task, SamplingParams(max_new_tokens=10, ignore_eos=True, **shapes[i % 6]))
                for i, r in enumerate(mixed_requests(tiny_tokenizer))]
    alone = run_alone(make_engine(), requests)
    together = make_engine().generate(requests)
    assert [r.tokens for r in alone] == [r.tokens for r in together]
    assert together[3].tokens == [9] * 10, "a bias of 100 makes its token the greedy choice"
    assert alone[1].tokens != make_engine().generate([Request(requests[1].prompt, requests[1].task,
                                                              SamplingParams(max_new_tokens=10, ignore_eos=True))]
                                                     )[0].tokens, "the frequency penalty should change the tokens"


def test_bad_shaping_is_refused_and_the_engine_serves_on(make_engine, tiny_tokenizer):
    with pytest.raises(InvalidRequest, match="presence_penalty.*frequency_penalty.*logit_bias"):
        SamplingParams(presence_penalty=2.5, frequency_penalty=-3, logit_bias=((1, 101.0),))
    engine = make_engine()
    vocab = engine.model.config.vocab_size
    ids = prompt(tiny_tokenizer, 3)
    for bad in (Request(ids, ROUTED[0], SamplingParams(logit_bias=((vocab, 1.0),))), Request(ids + [vocab], ROUTED[0])):
        with pytest.raises(InvalidRequest, match=f"token ids must be in \\[0, {vocab}\\)"):
            engine.submit(bad)
    assert engine.generate([Request(ids, ROUTED[0], SamplingParams(max_new_tokens=2))])[0].tokens
