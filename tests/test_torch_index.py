"""tools/torch_index.py: the index `make` installs torch from, and the Makefile's use of it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tools import torch_index

ROOT = Path(__file__).resolve().parents[1]
CPU = {"metadata": {"name": "torch", "version": "2.13.0+cpu", "requires_dist": ["filelock", "sympy>=1.13.3"]}}
CUDA = {"metadata": {"name": "torch", "version": "2.13.0", "requires_dist": [
    "filelock", 'cuda-toolkit[cublas]==13.0.3; platform_system == "Linux"',
    'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"']}}


def test_a_cuda_build_is_told_by_its_dependencies():
    assert torch_index.is_cuda_build(CUDA) and not torch_index.is_cuda_build(CPU)
    assert not torch_index.is_cuda_build({"metadata": {"name": "torch", "version": "2.13.0"}})


@pytest.mark.parametrize(("gpu", "pick", "want"), [
    (False, [CUDA], ["--index-url", torch_index.CPU_INDEX]),  # a CUDA build on a machine without a GPU
    (False, [CPU], []),  # pip finds a CPU wheel by itself (find-links, a mirror): keep it
    (False, [], []),  # already installed, or pip cannot tell: the install says the rest
    (True, [CUDA], []),  # a GPU: the CUDA build is the right one
])
def test_the_cpu_index_only_where_pip_would_pick_an_unusable_cuda_build(monkeypatch, gpu, pick, want):
    monkeypatch.setattr(torch_index, "has_nvidia_gpu", lambda: gpu)
    monkeypatch.setattr(torch_index, "pip_would_install", lambda requirement: pick)
    assert torch_index.index_options("torch==2.13.0") == want
    given = "https://download.pytorch.org/whl/cu128"
    assert torch_index.index_options("torch==2.13.0", given) == ["--index-url", given]  # used by itself


@pytest.mark.parametrize("target", ["venv", ".venv-vllm/install.stamp"])
def test_make_installs_torch_first_from_the_chosen_index(target):
    make = ["make", "-n", "-W", "pyproject.toml", target, "TORCH_INDEX_URL="]  # the commands, none run
    shown = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    installs = [line for line in shown if " -m pip install " in line]
    python = installs[0].split()[0]
    assert installs[0] == (f"{python} -m pip install --progress-bar off torch==2.13.0 "
                           f"$({python} tools/torch_index.py torch==2.13.0)")
    assert "-e '.[" in installs[1]
