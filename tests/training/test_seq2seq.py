"""Encoder-decoder (T5-style) backbones: the loss against transformers' own, pre-training, adaptation, eval."""

import torch

import mhr
from tests.training.conftest import small_config
from training import suite
from training.adapt import adapt
from training.data import TaskBatches, n_targets, task_names
from training.evaluate import evaluate_bundle
from training.loop import target_nll
from training.model import load_backbone
from training.pretrain import pretrain

T5_TARGETS = ["q", "v"]


def test_target_nll_matches_transformers_loss(tiny_t5_path, train_examples):
    model, tokenizer = load_backbone(str(tiny_t5_path))
    assert model.config.is_encoder_decoder
    data = TaskBatches(tokenizer, train_examples, task_names(train_examples), 4, 48, 0, encoder_decoder=True)
    batch = data[0]
    with torch.no_grad():
        ours = target_nll(model, batch)
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss  # mean over the decoder's label tokens
    torch.testing.assert_close(ours.sum() / n_targets(batch), reference)


def test_pretrain_adapt_eval(tiny_t5_path, train_examples, tmp_path):
    config = small_config(target_modules=T5_TARGETS, steps=3)
    bundle, result = pretrain(str(tiny_t5_path), train_examples, config, tmp_path / "b", progress=False)
    assert result.steps == 3 and all(loss > 0 for loss in result.losses)
    assert any(name.startswith("decoder.") for name in bundle.modules)  # both stacks are adapted
    held = suite.HELD_OUT_TASKS[0]
    adapt(tmp_path / "b", suite.generate(held, 4, 0), held, small_config(method="mhr-z", steps=2), progress=False)
    assert mhr.Bundle.load(tmp_path / "b").task(held).kind is mhr.TaskKind.ROUTED
    report = evaluate_bundle(tmp_path / "b", suite.generate(held, 3, 0, split="test"), max_new_tokens=4)
    assert report["tasks"][held]["n"] == 3 and set(report["average"]) == {"exact_match", "rouge_l", "loss"}
