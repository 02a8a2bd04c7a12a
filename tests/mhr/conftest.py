"""Fixtures of the bundle tests: one bundle built and saved per session (from the tiny Llama with random B and
routing logits); each test works on its own copy of that directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import mhr
from mhr import Bundle
from tests.mhr.bundles import CONFIG, DENSE_MODULES, MODULES, TASKS, TRAINING, Built, injected_model, random_lora


@pytest.fixture(scope="session")
def built(tiny_llama_path, tmp_path_factory) -> Built:
    model = injected_model(tiny_llama_path, n_tasks=len(TASKS))
    layers = mhr.mhr_layers(model)
    logits = {t: {m: layer.router.logits[i].detach().clone() for m, layer in layers.items()}
              for i, t in enumerate(TASKS)}
    bundle = Bundle.from_model(model, CONFIG, backbone=str(tiny_llama_path), tasks=TASKS, training=TRAINING)
    bundle.add_dense_task("dense-1", random_lora(DENSE_MODULES, 2, 4.0, seed=1), metadata={"method": "lora"})
    bundle.add_dense_task("dense-bf16", random_lora(MODULES, 3, 6.0, seed=2, dtype=torch.bfloat16))
    bundle.set_zero_shot(random_lora(MODULES, 4, 8.0, seed=3))
    path = tmp_path_factory.mktemp("built") / "bundle"
    bundle.save(path)
    return Built(model, bundle, path, logits)


@pytest.fixture
def saved(built, tmp_path) -> Path:
    """A private copy of the saved bundle directory."""
    return Path(shutil.copytree(built.path, tmp_path / "bundle"))


@pytest.fixture
def bundle(saved) -> Bundle:
    """The saved bundle, loaded: free to change and save back to `saved`."""
    return Bundle.load(saved)


