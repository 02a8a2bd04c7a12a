"""Two CPU processes under torchrun (gloo) end where one process with the same global batch ends."""

import os
import subprocess
import sys

import torch
from typer.testing import CliRunner

import mhr
from tests.training.conftest import TARGETS
from training import cli

COMMON = ["--method", "mhr", "--skills", "3", "--heads", "2", "--rank", "2", "--alpha", "2",
          "--target-modules", ",".join(TARGETS), "--steps", "3", "--grad-accum", "2", "--lr", "0.01",
          "--max-length", "48", "--sigmoid-routing", "--quiet"]  # sigmoid: no sampling to differ between runs


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
