"""Fixtures of the server tests: a bundle whose adapters visibly change the tiny model, engines on it, and the
HTTP server on such an engine with an `openai` client for it."""

from __future__ import annotations

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

import mhr
from server.config import ServerConfig
from server.engine.core import Engine
from server.http.app import create_app
from tests.server.loopback import serve_app

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROUTED = [f"task{i}" for i in range(6)]
DENSE = "dense-task"


def random_logits(bundle: mhr.Bundle, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, K = bundle.config.n_heads, bundle.config.n_skills
    return {m: torch.randn(h, K, generator=g) * 3 for m in bundle.modules}


def random_lora(bundle: mhr.Bundle, rank: int, seed: int, alpha: float = 4.0) -> mhr.LoRA:
    """A dense LoRA over half the modules (the others get no update), big enough to change outputs."""
    g = torch.Generator().manual_seed(seed)
    names = list(bundle.modules)[::2]
    A = {m: torch.randn(bundle.modules[m][0], rank, generator=g) * 0.2 for m in names}
    B = {m: torch.randn(rank, bundle.modules[m][1], generator=g) * 0.2 for m in names}
    return mhr.LoRA(A, B, alpha)


def save_served_bundle(model_path, path):
    """Six routed tasks and one dense task (rank 6, larger than the inventory's 4), saved at `path`."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = mhr.MHRConfig(n_skills=4, n_heads=2, rank=4, alpha=8.0, target_modules=TARGETS)
    layers = mhr.inject(model, config, n_tasks=len(ROUTED))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.normal_(std=0.3, generator=g)
            layer.lora_B.normal_(std=0.3, generator=g)
            layer.router.logits.normal_(std=3.0, generator=g)
    bundle = mhr.Bundle.from_model(model, config, backbone=str(model_path), tasks=ROUTED)
    bundle.add_dense_task(DENSE, random_lora(bundle, rank=6, seed=1))
    bundle.save(path)
    return path


@pytest.fixture(scope="session")
def bundle_path(tiny_llama_path, tmp_path_factory):
    return save_served_bundle(tiny_llama_path, tmp_path_factory.mktemp("bundles") / "served")


@pytest.fixture
def make_engine(tiny_llama_path, bundle_path, tiny_tokenizer):
    """engine(**config_overrides): a fresh float32 engine on the tiny model and the test bundle."""

    def make(dtype: torch.dtype = torch.float32, **overrides) -> Engine:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=dtype).eval()
        settings = dict(n_slots=8, max_running=16, max_seq_len=96, max_waiting=64) | overrides
        return Engine(model, mhr.Bundle.load(bundle_path), ServerConfig(**settings), tiny_tokenizer)

    return make


@pytest.fixture
def server(make_engine):
    """The API over real loopback on a fresh engine; its base URL."""
    with serve_app(create_app(make_engine())) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
