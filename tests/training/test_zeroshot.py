"""Zero-shot MHR-mu: the averaged adapter is trained on the multi-task data and stored in the bundle."""

import torch

import mhr
from tests.training.conftest import small_config
from training.zeroshot import zeroshot


def test_trained_average_becomes_the_zero_shot_adapter(bundle_copy, train_examples):
    before = mhr.Bundle.load(bundle_copy)
    assert before.zero_shot is None
    average = before.inventory().average()
    result = zeroshot(bundle_copy, train_examples, small_config(method="mhr-mu", steps=2), data_name="suite",
                      progress=False)
    after = mhr.Bundle.load(bundle_copy)
    assert result.steps == 2
    stored = after.zero_shot
    assert stored is not None and stored.modules == average.modules and stored.alpha == average.alpha
    assert not stored.equal(average)  # trained away from the plain average ...
    for m in average.modules:  # ... by a few small steps
        assert (stored.A[m] - average.A[m]).abs().max() < 0.1
    assert after.training["zero_shot"]["steps"] == 2 and after.training["zero_shot"]["data"] == "suite"
    assert after.task_names == before.task_names
    assert all(torch.equal(after.lora_A[m], before.lora_A[m]) for m in before.modules)
