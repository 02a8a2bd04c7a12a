"""The README's walkthrough end to end, at small sizes, over real HTTP.

Builds the demo with its own code path (a few steps), starts `python -m server` as a process, queries a
task (its own route, a completion, a chat), adapts a held-out task with MHR-z on a copy of the bundle in a
scratch directory, exports it with `mhr export-task`, deploys it through the admin route of the running
server, and queries it; then the one-call path: `mhr adapt --server` has the running server train the task
again and follows the job until it is live. No restart in between.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.processes import ROOT, server_process
from training import demo, suite

ADMIN_KEY = "test-admin-key"
# Two training tasks, a validation task and a held-out task, a few steps.
SMALL = demo.Recipe(tasks=("upper", "sort.rot1", "rot1.dropfirst.sort", "dropfirst.sort"), n_train=4, n_test=2,
                    n_shots=4, skills=2, mhr_heads=2, rank=2, mhr_steps=2, zeroshot_steps=2, zeroshot_eval_every=1)
TRAINED = [t for t in SMALL.tasks if t in suite.TRAIN_TASKS]
HELD_OUT = [t for t in SMALL.tasks if t in suite.HELD_OUT_TASKS]


def mhr_cli(*args: str, cwd: Path = ROOT) -> str:
    """Run `mhr ARGS` (as `python -m training`) in `cwd` and return its stdout; fail with its stderr."""
    done = subprocess.run([sys.executable, "-m", "training", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> demo.DemoBuild:
    return demo.build(tmp_path_factory.mktemp("demo"), SMALL, progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def server(built):
    """`python -m server` on a free port, serving a fresh copy of the demo bundle; yields its URL."""
    bundle, _ = demo.serving_copy(built)
    with server_process(["--bundle", str(bundle), "--model", str(built.backbone), "--admin-key", ADMIN_KEY],
                        built.root / "server.log") as (_, url):
        yield url


def test_build_is_cached_and_measured(built):
    assert demo.cached(built.root, SMALL) is not None
    assert set(built.exact_match) == set(TRAINED) and set(built.zero_shot_exact_match) == set(HELD_OUT)
    assert demo.cached(built.root, dataclasses.replace(SMALL, seed=1)) is None  # another recipe is not this cache
    assert demo.build(built.root, SMALL, log=lambda _: None).seconds == built.seconds  # reused, not rebuilt


def test_walkthrough(built, server, tmp_path):
    task = TRAINED[0]
    word = "kabadu"
    answer = httpx.post(f"{server}/v1/tasks/{task}/generate", timeout=60,
                        json={"inputs": suite.prompt(task, word), "max_new_tokens": 8}).json()
    assert answer["task"] == task and answer["adapter"] == task and len(answer["outputs"]) == 1
    completion = httpx.post(f"{server}/v1/completions", timeout=60,
                            json={"model": task, "prompt": suite.prompt(task, word), "max_tokens": 8,
                                  "temperature": 0}).json()
    assert completion["choices"][0]["text"] == answer["outputs"][0]["text"]  # greedy: the same answer
    chat = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                      json={"model": task, "messages": [{"role": "user", "content": suite.prompt(task, word)}],
                            "max_tokens": 8, "temperature": 0}).json()
    assert chat["choices"][0]["message"]["content"] == answer["outputs"][0]["text"]  # the demo's chat template

    held_out = HELD_OUT[0]
    unseen = httpx.post(f"{server}/v1/tasks/{held_out}/generate", timeout=60,
                        json={"inputs": suite.prompt(held_out, word), "max_new_tokens": 8})
    assert unseen.status_code == 200 and unseen.json()["adapter"] != held_out  # the zero-shot adapter

    # train: MHR-z on a handful of examples, into a copy of the bundle in a scratch directory (tmp_path, as
    # the README's `cd "$(mktemp -d)"`); export what the admin route takes
    shutil.copytree(built.bundle, tmp_path / "my-bundle")
    lines = [line for line in (built.suite / "heldout-train.jsonl").read_text().splitlines()
             if json.loads(line)["task"] == held_out]
    (tmp_path / "shots.jsonl").write_text("\n".join(lines) + "\n")
    adapted = mhr_cli("adapt", "--bundle", "my-bundle", "--data", "shots.jsonl", "--task", held_out,
                      "--method", "mhr-z", "--steps", "2", "--quiet", cwd=tmp_path)
    assert adapted.startswith(f"task '{held_out}' added to my-bundle (mhr-z, ")
    upload = tmp_path / f"{held_out}.safetensors"
    assert "routed task" in mhr_cli("export-task", "--bundle", "my-bundle", "--task", held_out, "--out", upload.name,
                                    cwd=tmp_path)

    # deploy to the running server, then query the new task
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.post(f"{server}/admin/tasks/{held_out}", content=upload.read_bytes(), timeout=60).status_code == 401
    deployed = httpx.post(f"{server}/admin/tasks/{held_out}", content=upload.read_bytes(), headers=headers, timeout=60)
    assert deployed.status_code == 201, deployed.text
    assert deployed.json()["kind"] == "routed"
    answer = httpx.post(f"{server}/v1/tasks/{held_out}/generate", timeout=60,
                        json={"inputs": suite.prompt(held_out, word), "max_new_tokens": 8}).json()
    assert answer["adapter"] == held_out
    models = {m["id"] for m in httpx.get(f"{server}/v1/models", timeout=30).json()["data"]}
    assert {held_out, task} <= models
    assert "mhr_" in httpx.get(f"{server}/metrics", timeout=30).text

    # the one-call path: the running server trains the task itself (here again, so --replace)
    live = mhr_cli("adapt", "--server", server, "--admin-key", ADMIN_KEY, "--data", "shots.jsonl", "--task",
                   held_out, "--steps", "2", "--replace", "--quiet", cwd=tmp_path)
    assert live.startswith(f"task '{held_out}' is live on {server} (revision ")
    (job,) = httpx.get(f"{server}/admin/jobs", headers=headers, timeout=30).json()["jobs"]
    assert job["state"] == "done" and job["task"] == held_out and job["step"] == 2
    answer = httpx.post(f"{server}/v1/tasks/{held_out}/generate", timeout=60,
                        json={"inputs": suite.prompt(held_out, word), "max_new_tokens": 8}).json()
    assert answer["adapter"] == held_out


def test_export_task_dense(built, tmp_path):
    """A dense task exports as `<module>.lora_A/B` with the alpha to upload it with."""
    from mhr.files import read_safetensors

    mine = tmp_path / "bundle"
    shutil.copytree(built.bundle, mine)
    shots = tmp_path / "shots.jsonl"
    shots.write_text("".join(ex.to_json() + "\n" for ex in suite.generate(HELD_OUT[0], 2, seed=0)))
    mhr_cli("adapt", "--bundle", str(mine), "--data", str(shots), "--task", HELD_OUT[0], "--method", "mhr-mu",
            "--steps", "1", "--quiet")
    out = tmp_path / "t.safetensors"
    printed = mhr_cli("export-task", "--bundle", str(mine), "--task", HELD_OUT[0], "--out", str(out))
    assert "?alpha=" in printed
    tensors = read_safetensors(out)
    assert tensors and all(k.endswith((".lora_A", ".lora_B")) for k in tensors)
