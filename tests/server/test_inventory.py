"""Adapters in slot layout equal mhr's materialization (routed, MHR-mu average, dense), scaling folded in B."""

import pytest
import torch

import mhr
from server.inventory import ServingInventory
from tests.server.conftest import DENSE, ROUTED


@pytest.fixture
def bundle(bundle_path):
    return mhr.Bundle.load(bundle_path)


def grouped(bundle):
    """Group modules by shape as the slot storage does."""
    groups = {}
    for name, dims in bundle.modules.items():
        groups.setdefault(dims, []).append(name)
    return list(groups.values())


def assert_matches(adapter, groups, lora):
    for names, (A, B) in zip(groups, adapter, strict=True):
        for i, name in enumerate(names):
            want_A = lora.A.get(name, torch.zeros(A.shape[1:]))
            want_B = lora.B[name] * lora.scaling if name in lora.B else torch.zeros(B.shape[1:])
            assert torch.allclose(A[i], want_A, atol=1e-6) and torch.allclose(B[i], want_B, atol=1e-6)


def test_routed_average_and_dense_match_mhr(bundle):
    groups = grouped(bundle)
    inventory = ServingInventory(bundle, groups, "cpu", torch.float32)
    reference = bundle.inventory()
    for task in ROUTED[:3]:
        assert_matches(inventory.routed(bundle.routing_logits(task)), groups, bundle.task_lora(task, reference))
    assert_matches(inventory.average(), groups, reference.average())
    assert_matches(inventory.dense(bundle.adapters[DENSE]), groups, bundle.adapters[DENSE])


def test_bfloat16_layout(bundle):
    inventory = ServingInventory(bundle, grouped(bundle), "cpu", torch.bfloat16)
    A, B = inventory.routed(bundle.routing_logits(ROUTED[0]))[0]
    assert A.dtype == B.dtype == torch.bfloat16 and A.shape[-1] == B.shape[-2] == bundle.config.rank
