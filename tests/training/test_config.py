"""TrainConfig validation, the inventory each method pre-trains, loading from a file."""

import json

import pytest
import torch

from training.config import PRETRAIN_METHODS, TrainConfig, TrainConfigError, resolve_device


def test_every_problem_is_listed_at_once():
    with pytest.raises(TrainConfigError) as e:
        TrainConfig(method="adam", steps=0, lr=-1.0, schedule="step", dtype="fp16", device="tpu", save_every=5)
    message = str(e.value)
    for part in ("method", "steps", "lr", "schedule", "dtype", "device", "checkpoint_dir"):
        assert part in message


@pytest.mark.parametrize("cuda, expected", [(False, "cpu"), (True, "cuda")])
def test_auto_device_is_cuda_when_available(monkeypatch, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert TrainConfig().device == "auto"  # kept as given: a recorded config means the same on another machine
    assert TrainConfig().torch_device == resolve_device("auto") == torch.device(expected)


@pytest.mark.parametrize("name", ["cpu", "cpu:0"])
def test_cpu_is_always_available(name):
    assert TrainConfig(device=name).torch_device.type == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_config_error(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainConfigError, match="CUDA is not available"):
        TrainConfig(device=name)
    with pytest.raises(TrainConfigError, match="CUDA is not available"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "meta", "", 0])
def test_unknown_devices_are_refused(name):
    with pytest.raises(TrainConfigError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        TrainConfig(device=name)


def test_an_inventory_that_does_not_fit_is_refused():
    with pytest.raises(TrainConfigError, match="target_modules"):
        TrainConfig(target_modules=[])


@pytest.mark.parametrize("method, shape", [("lora", (1, 1)), ("poly", (6, 1)), ("mhr", (6, 4))])
def test_method_decides_skills_and_heads(method, shape):
    config = TrainConfig(method=method, skills=6, heads=4, rank=2, alpha=4.0).mhr_config()
    assert (config.n_skills, config.n_heads) == shape
    assert (config.rank, config.alpha) == (2, 4.0)
    assert config.relaxed_routing == (method != "lora")


def test_commands_check_their_methods():
    TrainConfig(method="mhr").require_method(PRETRAIN_METHODS, "train")
    with pytest.raises(TrainConfigError, match="train takes method"):
        TrainConfig(method="mhr-z").require_method(PRETRAIN_METHODS, "train")


def test_file_values_are_overridden(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 50, "lr": 0.01}))
    config = TrainConfig.from_file(path, steps=7)
    assert (config.steps, config.lr) == (7, 0.01)
    path.write_text(json.dumps({"stepz": 50}))
    with pytest.raises(TrainConfigError, match="unknown TrainConfig field"):
        TrainConfig.from_file(path)


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 1e308, -1.0, 0.0])
def test_an_alpha_that_is_not_finite_positive_and_bounded_is_refused_naming_it(alpha):
    with pytest.raises(TrainConfigError, match="alpha"):
        TrainConfig(alpha=alpha, rank=2)
