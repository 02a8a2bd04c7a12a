"""Same weights, same outputs: MHR layers against PEFT's poly tuner (`n_splits` = heads).

PEFT is the independent reference for the whole routed forward: its own router, einsums and scaling
(hard-coded 1 / r, hence alpha = 1 here). Layout map, PEFT <- ours:
    poly_lora_A [h, K, d_in/h, r]    = lora_A.transpose(0, 1)      (ours [K, h, d_in/h, r])
    poly_lora_B [h, K, r, d_out/h]   = lora_B.transpose(0, 1)      (ours [K, h, r, d_out/h])
    module_logits [T, h * K]         = logits.reshape(T, h * K)    (ours [T, h, K])
"""

import pytest
import torch
from peft import PolyConfig, get_peft_model
from transformers import AutoModelForCausalLM

import mhr
from mhr import MHRConfig
from tests.mhr import reference

N_TASKS = 4
TARGETS = ["q_proj", "v_proj", "down_proj"]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def twin_models(path, h, K, r, seed=0, relaxed=True):
    """(MHR model, PEFT poly model), built from one checkpoint and holding identical adapter weights."""
    ours = load(path)
    layers = mhr.inject(ours, MHRConfig(n_skills=K, n_heads=h, rank=r, alpha=1.0, target_modules=TARGETS,
                                        relaxed_routing=relaxed), N_TASKS)
    poly = get_peft_model(load(path), PolyConfig(task_type="CAUSAL_LM", r=r, n_tasks=N_TASKS, n_skills=K,
                                                 n_splits=h, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in layers.items():
            reference.randomize(layer, g)  # B is zero at init in both: give it values first
            theirs = poly.base_model.model.get_submodule(name)
            theirs.poly_lora_A["default"].copy_(layer.lora_A.transpose(0, 1))
            theirs.poly_lora_B["default"].copy_(layer.lora_B.transpose(0, 1))
            theirs.poly_router["default"].module_logits.copy_(layer.router.logits.reshape(N_TASKS, h * K))
    assert len(layers) == 6
    return ours.eval(), poly.eval(), layers


def input_ids(batch, seed=0):
    return torch.randint(4, 384, (batch, 7), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("h, K, r", [(1, 3, 2), (2, 4, 1), (4, 2, 3)])
def test_eval_logits_match_peft_poly(tiny_llama_path, h, K, r):
    ours, poly, _ = twin_models(tiny_llama_path, h, K, r, seed=h)
    ids, tasks = input_ids(4), torch.tensor([2, 0, 2, 3])  # several tasks, one repeated
    with torch.no_grad():
        expected = poly(input_ids=ids, task_ids=tasks).logits
        with mhr.use_tasks(ours, tasks):
            got = ours(input_ids=ids).logits
        base = load(tiny_llama_path)(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapters matter, so the comparison means something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradients_match_peft_poly(tiny_llama_path):
    h, K, r = 2, 3, 2
    ours, poly, layers = twin_models(tiny_llama_path, h, K, r)
    ids, tasks = input_ids(3, seed=1), torch.tensor([1, 3, 1])
    poly(input_ids=ids, task_ids=tasks, labels=ids).loss.backward()
    with mhr.use_tasks(ours, tasks):
        ours(input_ids=ids, labels=ids).loss.backward()
    for name, layer in layers.items():
        theirs = poly.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad, theirs.poly_lora_A["default"].grad.transpose(0, 1),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, theirs.poly_lora_B["default"].grad.transpose(0, 1),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.router.logits.grad.reshape(N_TASKS, h * K),
                                   theirs.poly_router["default"].module_logits.grad, rtol=1e-4, atol=1e-7)


def test_relaxed_training_forward_matches_peft_poly_under_one_seed(tiny_llama_path):
    # Both sample one relaxed Bernoulli (temperature 1) per example and layer, in the same order.
    ours, poly, _ = twin_models(tiny_llama_path, 2, 3, 2)
    ours.train()
    poly.train()
    ids, tasks = input_ids(3, seed=2), torch.tensor([0, 1, 1])
    with torch.no_grad():
        torch.manual_seed(123)
        expected = poly(input_ids=ids, task_ids=tasks).logits
        torch.manual_seed(123)
        with mhr.use_tasks(ours, tasks):
            got = ours(input_ids=ids).logits
            again = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(again, got)  # and it really is sampling
