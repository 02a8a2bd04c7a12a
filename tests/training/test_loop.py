"""The shared loop: the loss against transformers' own, accumulation equals a big batch, what trains."""

import math

import pytest
import torch

import mhr
from tests.training.conftest import small_config
from training.data import IGNORE, TaskBatches, n_targets, task_names
from training.loop import target_nll, train
from training.model import seed_everything, set_trainable


def make_run(model, tokenizer, examples, **overrides):
    config = small_config(**overrides)
    tasks = task_names(examples)
    seed_everything(config.seed)
    mhr.inject(model, config.mhr_config(), len(tasks))
    set_trainable(model, skills=True, routing=config.method != "lora")
    return config, TaskBatches(tokenizer, examples, tasks, config.batch_size, config.max_length, config.seed)


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_target_nll_matches_transformers_loss(tiny_llama, tiny_tokenizer, train_examples):
    _, data = make_run(tiny_llama, tiny_tokenizer, train_examples)
    batch = data[0]
    # transformers wants labels in input positions (it shifts them itself): ours moved right by one
    hf_labels = torch.cat([torch.full_like(batch["labels"][:, :1], IGNORE), batch["labels"][:, :-1]], dim=1)
    with torch.no_grad(), mhr.use_tasks(tiny_llama, batch["task_ids"]):
        ours = target_nll(tiny_llama, batch)
        reference = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=hf_labels).loss  # mean over label tokens
    assert ours.shape == (4,)
    torch.testing.assert_close(ours.sum() / n_targets(batch), reference)


def test_accumulation_equals_one_big_batch(tiny_llama_path, tiny_tokenizer, train_examples):
    from transformers import AutoModelForCausalLM

    results = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
        # routing without sampling, so both runs see the same weights; then only batching differs
        config, data = make_run(model, tiny_tokenizer, train_examples, batch_size=batch_size,
                                grad_accum=grad_accum, steps=2)
        for layer in mhr.mhr_layers(model).values():
            layer.router.relaxed = False
        train(model, data, config, progress=False)
        results.append(adapter_state(model))
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-6)


def test_only_trainable_parameters_change(tiny_llama, tiny_tokenizer, train_examples):
    config, data = make_run(tiny_llama, tiny_tokenizer, train_examples, eval_every=2, steps=2)
    frozen = {n: p.detach().clone() for n, p in tiny_llama.named_parameters() if not p.requires_grad}
    before = adapter_state(tiny_llama)
    result = train(tiny_llama, data, config, eval_data=data, progress=False)
    assert result.steps == 2 and len(result.losses) == 2 and list(result.eval_losses) == [2]
    assert not tiny_llama.training
    for name, p in tiny_llama.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    changed = [n for n, p in adapter_state(tiny_llama).items() if not torch.equal(p, before[n])]
    assert any("router.logits" in n for n in changed) and any("lora_B" in n for n in changed)


@pytest.mark.parametrize("method", ["lora", "poly"])
def test_other_methods_train(tiny_llama, tiny_tokenizer, train_examples, method):
    config, data = make_run(tiny_llama, tiny_tokenizer, train_examples, method=method, steps=2, dtype="bf16")
    result = train(tiny_llama, data, config, progress=False)
    assert all(math.isfinite(x) for x in result.losses)
    layer = next(iter(mhr.mhr_layers(tiny_llama).values()))
    assert layer.lora_A.shape[:2] == ((1, 1) if method == "lora" else (3, 1))
    assert layer.router.logits.requires_grad == (method != "lora")
