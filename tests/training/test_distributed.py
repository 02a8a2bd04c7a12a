"""Two CPU processes under torchrun (gloo) end where one process with the same global batch ends; the
backend and each process's device follow the requested device."""

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import mhr
from tests.training.conftest import TARGETS
from training import cli
from training.distributed import SINGLE, World, backend

# sigmoid: no sampling to differ between runs; cpu: gloo, and two processes even with one GPU
COMMON = ["--method", "mhr", "--skills", "3", "--heads", "2", "--rank", "2", "--alpha", "2",
          "--target-modules", ",".join(TARGETS), "--steps", "3", "--grad-accum", "2", "--lr", "0.01",
          "--max-length", "48", "--sigmoid-routing", "--device", "cpu", "--quiet"]


def test_two_processes_equal_one_with_the_whole_batch(tiny_llama_path, suite_files, tmp_path):
    args = ["--model", str(tiny_llama_path), "--data", str(suite_files["train"]), *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "training", "train", "--out", str(tmp_path / "two"), "--batch-size", "2", *args],
        env=env, capture_output=True, text=True, timeout=240)
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = CliRunner().invoke(cli.app, ["train", "--out", str(tmp_path / "one"), "--batch-size", "4", *args])
    assert single.exit_code == 0, single.output

    two, one = mhr.Bundle.load(tmp_path / "two"), mhr.Bundle.load(tmp_path / "one")
    assert two.training["processes"] == 2 and one.training["processes"] == 1
    assert two.task_names == one.task_names
    for m in one.modules:
        for ours, theirs in ((two.lora_A, one.lora_A), (two.lora_B, one.lora_B), (two.routing, one.routing)):
            assert not torch.equal(theirs[m], torch.zeros_like(theirs[m]))
            torch.testing.assert_close(ours[m], theirs[m], rtol=1e-4, atol=1e-6)
    assert abs(two.training["final_loss"] - one.training["final_loss"]) < 1e-4


@pytest.mark.parametrize("device, expected", [("cuda", "nccl"), ("cuda:1", "nccl"), ("cpu", "gloo"), ("mps", "gloo")])
def test_backend_follows_the_device(device, expected):
    assert backend(torch.device(device)) == expected


@pytest.mark.parametrize("world, requested, expected", [
    (World(rank=3, size=4, local_rank=1), "cuda", "cuda:1"),   # torchrun: one GPU per process
    (World(rank=3, size=4, local_rank=1), "cuda:0", "cuda:1"),
    (World(rank=3, size=4, local_rank=1), "cpu", "cpu"),
    (SINGLE, "cuda:1", "cuda:1"),                               # no torchrun: as requested
    (SINGLE, "cpu", "cpu"),
])
def test_each_process_gets_its_device(world, requested, expected):
    assert world.device(torch.device(requested)) == torch.device(expected)
