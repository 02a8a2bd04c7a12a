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


def test_validation_picks_the_best_candidate_and_records_every_score(bundle_copy, train_examples, suite_files):
    from training.data import read_jsonl
    validation = read_jsonl(suite_files["validation-test"])[:6]
    zeroshot(bundle_copy, train_examples, small_config(method="mhr-mu", steps=2), validation=validation,
             eval_every=1, max_new_tokens=3, progress=False)
    bundle = mhr.Bundle.load(bundle_copy)
    record = bundle.training["zero_shot"]
    assert set(record["candidates"]) == {"backbone", "average", "trained"}
    assert record["candidates"]["trained"]["step"] in (1, 2)
    assert record["validation_tasks"] == sorted({ex.task for ex in validation})
    best = max(s["exact_match"] for s in record["candidates"].values())
    assert record["candidates"][record["selected"]]["exact_match"] == best
    stored = bundle.zero_shot
    if record["selected"] == "average":
        assert stored is None  # the format's own fallback is the plain average
    elif record["selected"] == "backbone":
        assert all(not b.any() for b in stored.B.values())  # no update: the backbone's outputs
    else:
        assert stored is not None and not stored.equal(bundle.inventory().average())


def test_ties_go_to_the_backbone(bundle_copy, train_examples, monkeypatch):
    """Every candidate scoring the same (as an untrained tiny model does), the backbone alone is kept."""
    from training import zeroshot as module
    monkeypatch.setattr(module, "validation_score", lambda *a: {"exact_match": 0.0, "loss": 1.0})
    zeroshot(bundle_copy, train_examples, small_config(method="mhr-mu", steps=1), validation=train_examples[:2],
             progress=False)
    bundle = mhr.Bundle.load(bundle_copy)
    assert bundle.training["zero_shot"]["selected"] == "backbone"
    assert all(not b.any() for b in bundle.zero_shot.B.values())
