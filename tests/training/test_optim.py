"""Parameter groups (logits apart, frozen parameters left out) and the learning-rate schedule."""

import math

import pytest

import mhr
from tests.training.conftest import small_config
from training.model import set_trainable
from training.optim import build_optimizer, lr_factor, param_groups


def test_logits_get_their_own_lr_and_no_decay(tiny_llama):
    config = small_config(lr=1e-3, logits_lr=0.1, weight_decay=0.05)
    layers = mhr.inject(tiny_llama, config.mhr_config(), n_tasks=3)
    set_trainable(tiny_llama, skills=True, routing=True)
    groups = {g["name"]: g for g in param_groups(tiny_llama, config)}
    logits = {id(layer.router.logits) for layer in layers.values()}
    skills = {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    assert {id(p) for p in groups["logits"]["params"]} == logits
    assert {id(p) for p in groups["adapters"]["params"]} == skills  # the frozen backbone is left out
    assert (groups["logits"]["lr"], groups["logits"]["weight_decay"]) == (0.1, 0.0)
    assert (groups["adapters"]["lr"], groups["adapters"]["weight_decay"]) == (1e-3, 0.05)


def test_frozen_routing_leaves_no_logits_group(tiny_llama):
    config = small_config()
    mhr.inject(tiny_llama, config.mhr_config(), n_tasks=1)
    set_trainable(tiny_llama, routing=True)
    assert [g["name"] for g in param_groups(tiny_llama, config)] == ["logits"]
    set_trainable(tiny_llama)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(tiny_llama, config)


@pytest.mark.parametrize("schedule, step, expected", [
    ("linear", 0, 1 / 5), ("linear", 3, 4 / 5),          # warmup: (step + 1) / (warmup + 1)
    ("linear", 4, 1.0), ("linear", 9, 0.5), ("linear", 14, 0.0), ("linear", 20, 0.0),
    ("cosine", 4, 1.0), ("cosine", 9, 0.5), ("cosine", 14, 0.0),
    ("cosine", 6, 0.5 * (1 + math.cos(math.pi * 0.2))),
    ("constant", 4, 1.0), ("constant", 14, 1.0),
])
def test_schedule(schedule, step, expected):
    assert lr_factor(step, warmup_steps=4, total_steps=14, schedule=schedule) == pytest.approx(expected)


def test_scheduler_applies_the_factor_to_each_group(tiny_llama):
    config = small_config(lr=1e-2, logits_lr=0.2, warmup_steps=1, steps=3, schedule="linear")
    mhr.inject(tiny_llama, config.mhr_config(), n_tasks=1)
    set_trainable(tiny_llama, skills=True, routing=True)
    optimizer, scheduler = build_optimizer(tiny_llama, config)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 5e-3])  # factor 1/2 in warmup
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.2, 1e-2])
