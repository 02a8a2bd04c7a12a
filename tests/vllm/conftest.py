"""Fixtures of the vLLM tests: the server tests' bundle, one vLLM engine for the whole session, and the
torch engine as the reference. vLLM is imported inside the fixtures, so collecting this folder without
vLLM installed only skips its tests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import mhr
from server.config import ServerConfig
from server.engine.core import Engine
from tests.server.conftest import save_served_bundle

# Fewer adapter slots than the tasks the tests use, so every test also exercises vLLM's slot scheduling
# and the engine's directory eviction.
VLLM_SETTINGS = dict(max_running=16, max_seq_len=96, max_waiting=64, vllm_max_loras=3, vllm_max_cpu_loras=4)
KV_CACHE_BYTES = 64 << 20  # the tiny model needs little; the default share of host memory is far larger


@pytest.fixture(scope="session")
def vllm_bundle_path(tiny_llama_path, tmp_path_factory):
    """The server tests' bundle: six routed tasks and a dense task of rank 6 over half the modules."""
    return save_served_bundle(tiny_llama_path, tmp_path_factory.mktemp("bundles") / "served")


@pytest.fixture(scope="session")
def vllm_engine(vllm_bundle_path, tmp_path_factory):
    """One vLLM engine (float32) for every test of this folder; tests that change tasks restore them."""
    pytest.importorskip("vllm")
    from server.vllm_backend.engine import VLLMEngine

    settings = ServerConfig(engine="vllm", bundle=str(vllm_bundle_path), **VLLM_SETTINGS)
    engine = VLLMEngine.from_config(settings, kv_cache_memory_bytes=KV_CACHE_BYTES, enable_prefix_caching=False)
    yield engine
    engine.close()


@pytest.fixture
def make_torch_engine(tiny_llama_path, vllm_bundle_path, tiny_tokenizer):
    """A fresh torch engine on the same bundle, the reference for the vLLM engine's tokens."""

    def make() -> Engine:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
        settings = {k: v for k, v in VLLM_SETTINGS.items() if not k.startswith("vllm_")}
        return Engine(model, mhr.Bundle.load(vllm_bundle_path), ServerConfig(n_slots=8, **settings), tiny_tokenizer)

    return make
