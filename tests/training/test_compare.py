"""The comparison script at minimal sizes: it runs every stage and writes the tables and the figure."""

from __future__ import annotations

import json

from tests.tiny import build_tiny_llama
from training.experiments import compare


def test_compare_writes_the_tables(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text(f"old\n{compare.ANALYSIS}\nwhat the numbers show\n")
    compare.main(["--out", str(out), "--work", str(tmp_path / "work"),
                  "--backbone", str(build_tiny_llama(tmp_path / "model")), "--pretrain-steps", "1",
                  "--adapt-steps", "1", "--zeroshot-steps", "1", "--shots", "2", "--seeds", "2",
                  "--tasks", "dedupe.rot2", "--n-train", "1", "--n-test", "1", "--jobs", "1", "--threads", "1"])
    text = (out / "results.md").read_text()
    for row in ("| shared LoRA |", "| Poly |", "| MHR |", "| MHR-z |", "| MHR-μ |", "| backbone alone |",
                "MHR-μ + 1 multi-task steps", "k=2 exact match"):
        assert row in text
    assert text.endswith(f"{compare.ANALYSIS}\nwhat the numbers show\n")  # the analysis is kept
    assert "old" not in text
    results = json.loads((out / "results.json").read_text())
    assert results["params"]["MHR-z"] < results["params"]["MHR-μ"] < results["params"]["MHR"]
    assert len(results["few_shot"]["MHR"]["2"]["exact_match"]["runs"]) == 2
    assert (out / "routing.png").read_bytes()[:4] == b"\x89PNG"
