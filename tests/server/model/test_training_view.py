"""The served backbone's training view: adaptation on it equals adaptation on the backbone loaded apart, shares
the served weights (no copy), and leaves the served model as it was."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mhr
from server.model.training_view import training_view
from tests.server.admin_helpers import generate
from tests.server.conftest import ROUTED
from training.adapt import adaptation_data, adapted, start
from training.config import TrainConfig
from training.data import Example
from training.loop import Optimization

WORDS = ("river", "stone", "quiet", "copies", "the", "light", "water", "field")


def shots():
    return [Example("new", f"The {w} and", f"the {w}") for w in WORDS]


def adapt_logits(model, tokenizer, bundle, config, steps):
    start(model, bundle, config)
    run = Optimization(model, adaptation_data(tokenizer, shots(), "new", config), config)
    model.train()
    for _ in range(steps):
        run.step()
    return adapted(model, config.method), run.result.losses


@pytest.mark.parametrize(("method", "cpu_kernel"), [("mhr-z", True), ("lora", False)])
def test_adapting_on_the_view_equals_adapting_apart(make_engine, tiny_llama_path, tiny_tokenizer, bundle_path,
                                                    cpu_kernel, method):
    engine = make_engine(cpu_kernel=cpu_kernel)
    before = [generate(engine, tiny_tokenizer, task) for task in (ROUTED[0], "dense-task")]
    bundle = mhr.Bundle.load(bundle_path)
    config = TrainConfig(method=method, steps=6, batch_size=4, lr=1e-2, device="cpu", max_length=64)
    apart = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    want, want_losses = adapt_logits(apart, tiny_tokenizer, bundle, config, 6)
    view = training_view(engine.model)
    got, got_losses = adapt_logits(view, tiny_tokenizer, bundle, config, 6)
    assert got_losses == pytest.approx(want_losses, rel=1e-4)
    if method == "mhr-z":
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    else:
        for name in want.A:
            torch.testing.assert_close(got.A[name], want.A[name], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.B[name], want.B[name], rtol=1e-4, atol=1e-5)
    served = {id(t) for t in [*engine.model.parameters(), *engine.model.buffers()]}
    frozen = [t for name, t in [*view.named_parameters(), *view.named_buffers()] if ".lora_" not in name
              and ".router." not in name and ".dense_" not in name]
    assert frozen and all(id(t) in served for t in frozen)  # the view holds no weight of its own
    assert not any(isinstance(m, mhr.MHRLinear) for m in engine.model.modules())
    assert not engine.model.training
    assert [generate(engine, tiny_tokenizer, task) for task in (ROUTED[0], "dense-task")] == before
