"""The engine contract: the torch engine keeps it (the vLLM engine's check is in tests/vllm), and the checks
both engines make of a task change."""

import pytest

import mhr
from server.engine.contract import ServingEngine, TrainableEngine, bundle_max_rank, check_replacement, check_task_change
from server.engine.requests import InvalidRequest
from tests.server.conftest import DENSE, random_logits, random_lora


def test_the_torch_engine_keeps_the_serving_contract(make_engine):
    assert isinstance(make_engine(), ServingEngine) and isinstance(make_engine(), TrainableEngine)


def test_a_task_is_given_by_exactly_one_of_logits_and_a_lora_within_the_rank(bundle_path):
    bundle = mhr.Bundle.load(bundle_path)
    logits, lora = random_logits(bundle, 0), random_lora(bundle, rank=4, seed=0)
    check_task_change(logits, None, 4)
    check_task_change(None, lora, 4)
    for both_or_none in ((logits, lora), (None, None)):
        with pytest.raises(ValueError, match="exactly one"):
            check_task_change(*both_or_none, 4)
    with pytest.raises(InvalidRequest, match="rank 4 exceeds"):
        check_task_change(None, lora, 3)


def test_a_replacement_needs_the_same_backbone_and_modules_within_the_rank(bundle_path):
    served = mhr.Bundle.load(bundle_path)
    assert bundle_max_rank(served) == served.adapters[DENSE].rank == 6  # the dense task's, above the inventory's 4
    check_replacement(served, mhr.Bundle.load(bundle_path), 6)
    with pytest.raises(ValueError, match="needs rank 6"):
        check_replacement(served, mhr.Bundle.load(bundle_path), 5)
    other = mhr.Bundle.load(bundle_path)
    other.fingerprint = "0" * 64  # trained on another backbone
    with pytest.raises(ValueError, match="another backbone"):
        check_replacement(served, other, 6)
