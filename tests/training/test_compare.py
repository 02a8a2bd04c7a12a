"""The comparison at minimal sizes: every stage runs, the tables and intervals are written; and the command in
docs/results.md's header is exactly what `make results` runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.tiny import build_tiny_llama
from training import suite
from training.experiments import compare, report


def test_compare_writes_the_tables_and_intervals(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text(f"old\n{report.ANALYSIS}\nwhat the numbers show\n")
    tasks = list(suite.HELD_OUT_TASKS[:2])
    compare.main(["--out", str(out), "--work", str(tmp_path / "work"), "--quick",
                  "--backbone", str(build_tiny_llama(tmp_path / "model")), "--pretrain-steps", "1",
                  "--adapt-steps", "1", "--zeroshot-steps", "2", "--shots", "2", "--pool", "3", "--seeds", "2",
                  "--fewshot-seeds", "2", "--tasks", *tasks, "--validation-tasks", suite.VALIDATION_TASKS[0],
                  "--n-train", "1", "--n-test", "2", "--pretrain-eval", "1", "--ablation-heads", "1", "2", "4",
                  "--lr-grid", "1e-2", "3e-2", "--jobs", "1"])
    text = (out / "results.md").read_text()
    for row in ("| LoRA |", "| Poly |", "| MHR |", "| MHR-z |", "| MHR-μ |", "| MHR − Poly |", "| MHR-z − MHR |",
                "| backbone alone |", "picked on validation (served)", "| 2 |", "| lora |"):
        assert row in text, row
    assert text.endswith(f"{report.ANALYSIS}\nwhat the numbers show\n")  # the analysis is kept
    assert "old" not in text
    results = json.loads((out / "results.json").read_text())
    assert results["few_shot"]["MHR-z"]["params"] < results["few_shot"]["MHR-μ"]["params"] \
        < results["few_shot"]["MHR"]["params"]
    assert len(results["learning_rates"]["MHR"]["grid"]) == 2 and len(results["learning_rates"]["MHR-z"]["grid"]) == 1
    assert set(results["differences"]) == {"MHR − Poly", "MHR − LoRA", "MHR-z − MHR", "MHR-μ − MHR"}
    for interval in results["differences"].values():
        assert interval["low"] <= interval["mean"] <= interval["high"]
    assert set(results["ablation"]) == {"1", "2", "4"}
    assert set(results["zero_shot"]["selected"].values()) <= {"backbone", "average", "trained"}
    assert (out / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert "MHR − Poly" in results["loss_differences"]
    (out / "results.md").write_text(f"stale\n{report.ANALYSIS}\nwhat the numbers show\n")
    compare.main(["--out", str(out), "--rerender"])  # the same report from the kept runs, no run again
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "results.md").read_text() == text


def test_make_results_runs_the_command_in_the_header():
    """docs/results.md says what made it; `make results` must run exactly that."""
    root = Path(__file__).resolve().parents[2]
    header = re.search(r"Made by `([^`]+)`", (root / "docs" / "results.md").read_text()).group(1)
    recipe = (root / "Makefile").read_text().split("\nresults:", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip().replace("$(VENV)/bin/", "") for line in recipe.splitlines()[1:] if line.strip()]
    assert commands == [header]
