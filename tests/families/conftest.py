"""Fixtures of the family tests: a family's tiny model trained a few steps on suite tasks, and its bundle."""

from __future__ import annotations

from pathlib import Path

import mhr
from tests.families.models import Family, build_family
from tests.training.conftest import small_config
from training import suite
from training.pretrain import pretrain

TASKS = suite.TRAIN_TASKS[:3]


def train_family(family: Family, out: Path) -> tuple[Path, mhr.Bundle]:
    """The family's tiny model (in out/model) trained 3 steps on TASKS with MHR; its bundle is saved in out/bundle.
    Returns the model's directory and the bundle."""
    model_path = build_family(family, out / "model")
    examples = [ex for task in TASKS for ex in suite.generate(task, 8, seed=0)]
    config = small_config(target_modules=list(family.targets), alpha=8.0, lr=3e-2)  # adapters that change tokens
    bundle, _ = pretrain(str(model_path), examples, config, out / "bundle", progress=False)
    return model_path, bundle
