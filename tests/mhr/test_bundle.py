"""mhr.bundle: an exact round trip, the task LoRAs a bundle gives, its backbone fingerprint."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mhr
import mhr.bundle
from mhr import Bundle, MHRConfig, SkillInventory, TaskKind
from tests.mhr.bundles import (
    CONFIG,
    FILES,
    MODULES,
    Q0,
    TASKS,
    TRAINING,
    assert_same_bundle,
    assert_same_lora,
    files_in,
    listed_files,
    load_error,
    load_model,
    manifest_of,
    random_lora,
    stored,
)
from tests.mhr.reference import eval_weights, task_lora
from tests.tiny import MODEL_SHAPE

# ----- round trip ----------------------------------------------------------------------------------

def test_round_trip_is_exact(built, tiny_llama_path):
    loaded = Bundle.load(built.path)  # `built` saved it
    assert_same_bundle(loaded, built.bundle)
    assert loaded.task_names == [*TASKS, "dense-1", "dense-bf16"]
    assert [t.kind for t in loaded.tasks] == [TaskKind.ROUTED] * 3 + [TaskKind.DENSE] * 2
    assert loaded.task("dense-1").metadata == {"method": "lora"}
    assert loaded.adapters["dense-bf16"].A[Q0].dtype == torch.bfloat16
    assert (loaded.config, loaded.training, loaded.backbone) == (CONFIG, TRAINING, str(tiny_llama_path))
    assert loaded.modules == {m: (64, 64) for m in MODULES}
    assert loaded.fingerprint == mhr.backbone_fingerprint(built.model)
    # Every listed file is stored under its content-derived name and matches its listed sha256.
    files = manifest_of(built.path)["files"]
    assert set(files) == {*FILES, "adapters/dense-bf16.safetensors"}
    for rel, digest in files.items():
        assert hashlib.sha256((built.path / stored(rel, digest)).read_bytes()).hexdigest() == digest
    assert files_in(built.path) == listed_files(built.path)
    # The inventory and logits are the model's own parameters.
    for m, layer in mhr.mhr_layers(built.model).items():
        assert torch.equal(loaded.lora_A[m], layer.lora_A.detach())
        assert torch.equal(loaded.lora_B[m], layer.lora_B.detach())
        assert torch.equal(loaded.routing[m], layer.router.logits.detach())


def test_routed_task_lora_is_the_models_materialization(built):
    loaded = Bundle.load(built.path)
    layers = mhr.mhr_layers(built.model)
    from_layers = SkillInventory.from_model(built.model)
    for i, task in enumerate(TASKS):
        got = loaded.task_lora(task)
        want = from_layers.materialize_logits({m: layer.router.logits[i].detach() for m, layer in layers.items()})
        assert_same_lora(got, want)
        for m, layer in layers.items():  # and the float64 loop reference of docs/architecture.md, "The math"
            A_ref, B_ref = task_lora(layer.lora_A, layer.lora_B, eval_weights(layer.router.logits[i]))
            torch.testing.assert_close(got.A[m].double(), A_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.B[m].double(), B_ref, rtol=1e-5, atol=1e-6)


def test_dense_task_lora_is_the_stored_adapter(built):
    loaded = Bundle.load(built.path)
    assert_same_lora(loaded.task_lora("dense-1"), built.bundle.adapters["dense-1"])


def test_zero_shot_falls_back_to_the_skill_average(built, bundle, saved):
    bundle.set_zero_shot(None)
    bundle.save(saved)
    loaded = Bundle.load(saved)
    assert loaded.zero_shot is None and "zero_shot.safetensors" not in manifest_of(saved)["files"]
    assert files_in(saved) == listed_files(saved)  # its file is gone
    average = loaded.zero_shot_lora()
    assert average.alpha == CONFIG.alpha
    for m in MODULES:
        A, B = built.bundle.lora_A[m], built.bundle.lora_B[m]  # [K, h, d_in/h, r], [K, h, r, d_out/h]
        A_mu = torch.mean(A, dim=0).reshape(64, 4)                     # heads stacked along d_in
        B_mu = torch.mean(B, dim=0).permute(1, 0, 2).reshape(4, 64)    # heads side by side along d_out
        torch.testing.assert_close(average.A[m], A_mu)
        torch.testing.assert_close(average.B[m], B_mu)


def test_dense_modules_keep_model_order_through_a_round_trip(tiny_llama_path, tmp_path):
    """Model order (q, k, v, o per layer) is not name order (k, o, q, v): a dense LoRA given in any order
    is held, saved and read back in the bundle's module order, so its digest survives a round trip."""
    config = MHRConfig(n_skills=2, n_heads=2, rank=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = load_model(tiny_llama_path)
    mhr.inject(model, config, n_tasks=0)
    bundle = Bundle.from_model(model, config, "tiny", tasks=[])
    order = list(bundle.modules)
    assert order[:4] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    bundle.add_dense_task("d", random_lora(sorted(order, reverse=True), 2, 2.0, seed=20))
    bundle.set_zero_shot(random_lora(sorted(order), 2, 2.0, seed=21))
    assert list(bundle.adapters["d"].A) == list(bundle.zero_shot.A) == order
    bundle.save(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b")
    assert_same_lora(loaded.adapters["d"], bundle.adapters["d"])
    assert_same_lora(loaded.zero_shot, bundle.zero_shot)


def test_stored_zero_shot_adapter_is_served(built):
    assert_same_lora(Bundle.load(built.path).zero_shot_lora(), built.bundle.zero_shot)


def test_backbone_fingerprint_looks_through_mhr_layers_and_ignores_values(built, tiny_llama, tiny_llama_path):
    assert mhr.backbone_fingerprint(built.model) == mhr.backbone_fingerprint(tiny_llama)
    other_seed = LlamaForCausalLM(tiny_llama.config)  # same shapes, other weights
    assert mhr.backbone_fingerprint(other_seed) == mhr.backbone_fingerprint(tiny_llama)
    mhr.inject(other_seed, CONFIG, n_tasks=1)
    mhr.start_average(other_seed)  # dense LoRA parameters are adapter parameters too
    assert mhr.backbone_fingerprint(other_seed) == mhr.backbone_fingerprint(tiny_llama)
    Bundle.load(built.path, model=tiny_llama)
    Bundle.load(built.path, model=other_seed)


@pytest.mark.parametrize("change", [{"hidden_size": 128}, {"num_hidden_layers": 3}, {"intermediate_size": 64}])
def test_backbone_mismatch_is_refused(built, tiny_llama, change):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=tiny_llama.config.vocab_size, **{**MODEL_SHAPE, **change}))
    msg = load_error(built.path, model=other)
    assert "backbone mismatch" in msg and built.bundle.backbone in msg
    assert built.bundle.fingerprint[:16] in msg and mhr.backbone_fingerprint(other)[:16] in msg
