"""Routing pictures: the averaged weights against the loop reference, similarity by hand, a PNG file."""

import pytest
import torch

import mhr
from tests.mhr import reference
from training.plot import plot_routing, routing_table, task_similarity


def routed_bundle(logits_per_module):
    """A bundle whose only content that matters is its routing logits {module: [T, h, K]}."""
    T, h, K = next(iter(logits_per_module.values())).shape
    config = mhr.MHRConfig(n_skills=K, n_heads=h, rank=1, target_modules=list(logits_per_module))
    modules = {m: (h, h) for m in logits_per_module}
    bundle = mhr.Bundle(config=config, backbone="none", fingerprint="none", modules=modules,
                        lora_A={m: torch.zeros(K, h, 1, 1) for m in modules},
                        lora_B={m: torch.zeros(K, h, 1, 1) for m in modules})
    for t in range(T):
        bundle.add_routed_task(f"task{t}", {m: logits[t] for m, logits in logits_per_module.items()})
    return bundle


def test_table_averages_evaluation_weights_over_modules():
    g = torch.Generator().manual_seed(0)
    logits = {m: torch.randn(3, 2, 4, generator=g) * 2 for m in ("a", "b")}
    names, table = routing_table(routed_bundle(logits))
    assert names == ["task0", "task1", "task2"] and table.shape == (3, 2, 4)
    for t in range(3):
        expected = (reference.eval_weights(logits["a"][t]) + reference.eval_weights(logits["b"][t])) / 2
        torch.testing.assert_close(table[t].double(), expected, rtol=1e-5, atol=1e-6)


def test_similarity_by_hand():
    big = 20.0  # sigmoid(20) = 1, sigmoid(-20) = 0 in float32: each head picks skills outright
    logits = torch.tensor([[[big, -big]], [[big, -big]], [[-big, big]], [[big, big]]])  # [T=4, h=1, K=2]
    similarity = task_similarity(routed_bundle({"a": logits}))
    # weights: [1, 0], [1, 0], [0, 1], [1/2, 1/2]
    expected = torch.tensor([[1, 1, 0, 0.5 ** 0.5], [1, 1, 0, 0.5 ** 0.5], [0, 0, 1, 0.5 ** 0.5],
                             [0.5 ** 0.5, 0.5 ** 0.5, 0.5 ** 0.5, 1]])
    torch.testing.assert_close(similarity, expected, rtol=1e-5, atol=1e-6)


def test_png_is_written_and_a_bundle_without_routing_is_refused(tmp_path):
    g = torch.Generator().manual_seed(1)
    path = plot_routing(routed_bundle({"a": torch.randn(5, 2, 3, generator=g)}), tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = routed_bundle({"a": torch.zeros(1, 2, 3)})
    empty.remove_task("task0")
    with pytest.raises(mhr.BundleError, match="no routed tasks"):
        plot_routing(empty, tmp_path / "none.png")
