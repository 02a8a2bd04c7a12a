"""The adaptation benchmark end to end on the tiny model (a few steps, a short stream): its table, and the job's
logits equal to offline `mhr adapt`'s (no timing is checked)."""

from __future__ import annotations

import json

from bench import bench_adapt
from tests.server.conftest import save_served_bundle

WORDS = ["river", "stone", "quiet", "copies", "light", "water", "field", "bridge", "market", "lantern"]


def test_the_benchmark_runs_and_reports_the_job_equal_to_offline(tiny_llama_path, tmp_path, capsys):
    bundle = save_served_bundle(tiny_llama_path, tmp_path / "bundle")
    lines = [json.dumps({"task": "new-task", "input": f"The {w} and", "target": f"the {w}"}) for w in WORDS]
    (tmp_path / "shots.jsonl").write_text("\n".join(lines[:8]))
    (tmp_path / "test.jsonl").write_text("\n".join(lines[8:]))
    bench_adapt.main(["--bundle", str(bundle), "--model", str(tiny_llama_path),
                      "--shots", str(tmp_path / "shots.jsonl"), "--test", str(tmp_path / "test.jsonl"),
                      "--steps", "3", "--tasks", "1", "--latency-seconds", "1", "--rate", "4"])
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("new-task")]
    assert float(row.split()[-1]) < 1e-4  # |job - offline|
    assert "p99 with a job / without:" in out
    stream = [line.split() for line in out.splitlines() if line.startswith(("no job", "job training"))]
    assert [int(cols[-3]) for cols in stream] == [4, 4]
