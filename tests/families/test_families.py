"""Every model family end to end: train a few steps, write a bundle, serve a mixed batch, and get the greedy
tokens of transformers + PEFT for each task (its adapter exported with `mhr.export_peft`)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mhr
from server.config import ServerConfig
from server.engine.core import Engine
from server.engine.requests import Request, SamplingParams
from tests.families.conftest import TASKS, train_family
from tests.families.models import FAMILIES, LEAN
from tests.server.engine.test_core import WORDS, peft_greedy

GREEDY = SamplingParams(max_new_tokens=10)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")  # PEFT on GPT-2's Conv1D says what it does
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_trained_bundle_serves_a_mixed_batch_like_peft(family, tmp_path):
    model_path, bundle = train_family(family, tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    # prompts plus their tokens run past the families' sliding windows (tests.families.models.WINDOW)
    engine = Engine(model, mhr.Bundle.load(tmp_path / "bundle"), ServerConfig(n_slots=4, max_seq_len=64), tokenizer)
    assert (engine.lean is not None) == (family.name in LEAN)
    prompts = [tokenizer(" ".join(WORDS[i:i + 5 + 3 * i]))["input_ids"] for i in range(len(TASKS))]
    rows = [Request(p, task, GREEDY) for p, task in zip(prompts, TASKS, strict=True)]
    served = engine.generate(rows + [Request(p, None, GREEDY) for p in prompts])  # with the base model's rows
    tasks, base = served[:len(TASKS)], served[len(TASKS):]

    for p, task, result in zip(prompts, TASKS, tasks, strict=True):
        want = peft_greedy(model_path, bundle.task_lora(task), tmp_path / task, p, GREEDY.max_new_tokens)
        assert result.tokens == want, task
    assert any(t.tokens != b.tokens for t, b in zip(tasks, base, strict=True)), "the adapters should change tokens"
