"""Shared fixtures: a tiny seeded Llama and its tokenizer, built once per session, never downloaded.

Also keeps every test offline and on at most two CPU threads, and skips `gpu`-marked tests
when CUDA is absent.
"""

import os

# Set before transformers / huggingface_hub are imported anywhere, so nothing reaches the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tests.tiny import build_tiny_llama  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; skipped on CPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """Directory holding the tiny Llama (safetensors, float32) and its tokenizer, seed 0."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture
def tiny_llama(tiny_llama_path):
    """A fresh copy of the tiny model for each test: float32, eval mode, on CPU."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_tokenizer(tiny_llama_path):
    return AutoTokenizer.from_pretrained(tiny_llama_path)
