"""The vLLM engine on each model family whose architecture vLLM serves with LoRA: a trained bundle's mixed batch
gives the torch engine's tokens (which `tests/families` checks against transformers + PEFT). GPT-2 is not here:
vLLM 0.32 has no LoRA for `GPT2LMHeadModel` (docs/families.md)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.config import ServerConfig
from server.engine.core import Engine
from tests.families.conftest import TASKS, train_family
from tests.families.models import FAMILIES
from tests.vllm.conftest import KV_CACHE_BYTES, VLLM_SETTINGS
from tests.vllm.test_vllm_engine import requests

pytest.importorskip("vllm")

SERVED = [f for f in FAMILIES if f.name != "gpt2"]


@pytest.mark.parametrize("family", SERVED, ids=lambda f: f.name)
def test_a_mixed_batch_matches_the_torch_engine(family, tmp_path):
    from server.vllm_backend.engine import VLLMEngine

    model_path, bundle = train_family(family, tmp_path)
    settings = ServerConfig(engine="vllm", model=str(model_path), bundle=str(tmp_path / "bundle"), **VLLM_SETTINGS)
    engine = VLLMEngine.from_config(settings, kv_cache_memory_bytes=KV_CACHE_BYTES, enable_prefix_caching=False)
    try:
        got = engine.generate(requests(TASKS, max_new_tokens=12))  # past the sliding windows of 8
    finally:
        engine.close()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    torch_settings = {k: v for k, v in VLLM_SETTINGS.items() if not k.startswith("vllm_")}
    want = Engine(model, bundle, ServerConfig(n_slots=8, **torch_settings)).generate(requests(TASKS, max_new_tokens=12))
    for task, g, w in zip(TASKS, got, want, strict=True):
        assert g.error is None, g.error
        assert g.tokens == w.tokens, task
