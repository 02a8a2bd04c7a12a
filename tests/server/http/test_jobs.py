"""Adaptation jobs over real HTTP: a new task trained by the live server from a few examples, equal to what
`mhr adapt` trains offline, deployed on disk and served; cancel, failure, limits, bad input, serving during a
job, restart and shutdown."""

from __future__ import annotations

import json
import time

import pytest
import torch

import mhr
from tests.server import loopback as http
from tests.server.admin_helpers import ADMIN, admin_app, copy_bundle, engine_on, logits_upload
from tests.server.conftest import ROUTED
from tests.server.loopback import serve_app
from training.adapt import adapt
from training.config import TrainConfig
from training.data import Example

WORDS = ["river", "stone", "quiet", "copies", "light", "water", "field", "bridge"]
EXAMPLES = [{"input": f"The {w} and", "output": f"the {w}"} for w in WORDS]
SETTINGS = {"steps": 12, "batch_size": 4, "logits_lr": 0.3, "seed": 5}


@pytest.fixture
def served(tiny_llama_path, tiny_tokenizer, bundle_path, tmp_path):
    def serve(**settings):
        bundle_dir = copy_bundle(bundle_path, tmp_path / f"bundle{len(list(tmp_path.iterdir()))}")
        engine = engine_on(tiny_llama_path, tiny_tokenizer, bundle_dir)
        return bundle_dir, engine, serve_app(admin_app(engine, bundle_dir, **settings))

    return serve


def start_job(base: str, task: str, **body) -> dict:
    r = http.post(f"{base}/admin/tasks/{task}/adapt", json={"examples": EXAMPLES, **SETTINGS} | body, headers=ADMIN)
    assert r.status_code == 202, r.text
    return r.json()


def wait_job(base: str, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = http.get(f"{base}/admin/jobs/{job_id}", headers=ADMIN)
        assert r.status_code == 200, r.text
        if r.json()["state"] in states:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {r.json()['state']} after {timeout} s")


def greedy(base: str, task: str, prompt: str = "The quiet river copies the stone") -> str:
    r = http.post(f"{base}/v1/completions", json={"model": task, "prompt": prompt, "max_tokens": 6,
                                                  "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_job_trains_what_mhr_adapt_trains_deploys_it_and_a_restart_serves_it(served, tiny_llama_path,
                                                                               tiny_tokenizer, bundle_path, tmp_path):
    bundle_dir, engine, server = served()
    with server as base:
        job = start_job(base, "new-task")
        assert job["state"] in ("queued", "running") and job["steps"] == 12 and job["examples"] == 8
        ended = wait_job(base, job["id"])
        assert ended["state"] == "done", ended
        assert ended["step"] == 12 and ended["loss"] > 0 and ended["error"] is None
        listed = http.get(f"{base}/admin/jobs", headers=ADMIN).json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]
        served_answer = greedy(base, "new-task")
        metrics = http.get(f"{base}/metrics").text
    stored = mhr.Bundle.load(bundle_dir)
    assert stored.revision == ended["revision"] and stored.task("new-task").kind is mhr.TaskKind.ROUTED
    assert stored.task("new-task").metadata["deployed"] == "adapt"
    offline_dir = copy_bundle(bundle_path, tmp_path / "offline")
    config = TrainConfig(method="mhr-z", device="cpu", max_length=96,
                         **{k: v for k, v in SETTINGS.items()})
    adapt(offline_dir, [Example("new-task", e["input"], e["output"]) for e in EXAMPLES], "new-task", config,
          progress=False)
    offline = mhr.Bundle.load(offline_dir)
    for name, logits in offline.routing_logits("new-task").items():
        torch.testing.assert_close(stored.routing_logits("new-task")[name], logits, rtol=1e-4, atol=1e-5)
    assert 'mhr_adapt_jobs{state="done"} 1.0' in metrics and "mhr_adapt_steps_total 12.0" in metrics
    assert 'mhr_adapt_job_seconds_count{state="done"} 1.0' in metrics
    restarted = engine_on(tiny_llama_path, tiny_tokenizer, bundle_dir)
    with serve_app(admin_app(restarted, bundle_dir)) as base:
        assert greedy(base, "new-task") == served_answer


def test_cancel_a_running_and_a_queued_job_writes_nothing(served):
    bundle_dir, engine, server = served(max_jobs=1, max_queued_jobs=2)
    revision = mhr.Bundle.load(bundle_dir).revision
    with server as base:
        running = start_job(base, "long-task", steps=100_000)
        queued = start_job(base, "next-task")
        assert queued["state"] == "queued"
        r = http.delete(f"{base}/admin/jobs/{queued['id']}", headers=ADMIN)
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        wait_job(base, running["id"], states=("running",))
        while wait_job(base, running["id"], states=("running",))["step"] < 2:
            time.sleep(0.05)
        r = http.delete(f"{base}/admin/jobs/{running['id']}", headers=ADMIN)
        assert r.status_code == 200, r.text
        ended = wait_job(base, running["id"])
        assert ended["state"] == "cancelled" and 2 <= ended["step"] < 100_000 and ended["revision"] is None
        r = http.delete(f"{base}/admin/jobs/{running['id']}", headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_ended"
        assert http.get(f"{base}/admin/jobs/job-unknown", headers=ADMIN).status_code == 404
        names = [t["name"] for t in http.get(f"{base}/v1/tasks").json()["tasks"]]
        assert "long-task" not in names and "next-task" not in names
    assert mhr.Bundle.load(bundle_dir).revision == revision


def test_a_failing_job_ends_failed_with_its_error_and_serving_goes_on(served):
    bundle_dir, engine, server = served()
    revision = mhr.Bundle.load(bundle_dir).revision
    with server as base:
        before = greedy(base, ROUTED[0])
        job = start_job(base, "diverges", method="lora", lr=1e30, steps=20)  # the loss overflows
        ended = wait_job(base, job["id"])
        assert ended["state"] == "failed" and "loss is" in ended["error"], ended
        # a deploy refused at the end (the name was taken meanwhile) fails the job too
        taken = start_job(base, "taken", steps=200)
        wait_job(base, taken["id"], states=("running",))
        logits = {m: torch.zeros(2, 4) for m in mhr.Bundle.load(bundle_dir).modules}
        r = http.post(f"{base}/admin/tasks/taken", content=logits_upload(logits), headers=ADMIN)
        assert r.status_code == 201, r.text
        ended = wait_job(base, taken["id"])
        assert ended["state"] == "failed" and "already exists" in ended["error"], ended
        assert greedy(base, ROUTED[0]) == before
        metrics = http.get(f"{base}/metrics").text
        assert 'mhr_adapt_jobs{state="failed"} 2.0' in metrics
    assert mhr.Bundle.load(bundle_dir).revision == revision + 1  # the upload only


def test_jobs_past_the_queue_limit_get_429(served):
    _, _, server = served(max_jobs=1, max_queued_jobs=1)
    with server as base:
        first = start_job(base, "one", steps=100_000)
        start_job(base, "two")
        r = http.post(f"{base}/admin/tasks/three/adapt", json={"examples": EXAMPLES}, headers=ADMIN)
        assert r.status_code == 429 and r.json()["error"]["code"] == "jobs_queue_full"
        assert r.headers["Retry-After"]
        r = http.post(f"{base}/admin/tasks/one/adapt", json={"examples": EXAMPLES, "replace": True}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_exists"
        states = sorted(j["state"] for j in http.get(f"{base}/admin/jobs", headers=ADMIN).json()["jobs"])
        assert states == ["queued", "running"]
        http.delete(f"{base}/admin/jobs/{first['id']}", headers=ADMIN)


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"examples": []}, 400, "examples"),
    ({"examples": [{"input": "a"}]}, 400, "output"),
    ({"examples": EXAMPLES, "method": "dpo"}, 400, "method"),
    ({"examples": EXAMPLES, "steps": 0}, 400, "steps"),
    ({"examples": EXAMPLES, "lr": -1}, 400, "lr"),
    ({"examples": EXAMPLES, "schedule": "exp"}, 400, "schedule"),
    ({"examples": [{"input": "word " * 200, "output": "x"}]}, 400, "context limit"),
    ({"examples": "not json\n"}, 400, "line 1"),
    ({"examples": json.dumps({"task": "other", "input": "a", "target": "b"})}, 400, "unknown task"),
    ({"examples": EXAMPLES * 3}, 400, "at most 16"),
    ({"examples": EXAMPLES, "unknown": 1}, 400, "unknown"),
])
def test_bad_requests_get_a_clear_4xx(served, body, status, says):
    _, _, server = served(max_job_examples=16)
    with server as base:
        r = http.post(f"{base}/admin/tasks/new-task/adapt", json=body, headers=ADMIN)
        assert r.status_code == status, r.text
        assert says in r.json()["error"]["message"], r.json()
        assert http.get(f"{base}/admin/jobs", headers=ADMIN).json()["jobs"] == []


def test_names_in_use_reserved_or_unkeyed_are_refused(served):
    _, _, server = served()
    with server as base:
        r = http.post(f"{base}/admin/tasks/{ROUTED[0]}/adapt", json={"examples": EXAMPLES}, headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "task_exists"
        r = http.post(f"{base}/admin/tasks/zero-shot/adapt", json={"examples": EXAMPLES}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == "task"
        assert http.post(f"{base}/admin/tasks/t/adapt", json={"examples": EXAMPLES}).status_code == 401
        assert http.get(f"{base}/admin/jobs").status_code == 401


def test_jsonl_examples_train_as_the_list_does(served):
    _, _, server = served()
    jsonl = "\n".join(json.dumps({"task": "new-task", "input": e["input"], "target": e["output"]}) for e in EXAMPLES)
    with server as base:
        by_list = wait_job(base, start_job(base, "new-task", steps=3)["id"])
        by_jsonl = wait_job(base, start_job(base, "new-task", examples=jsonl, steps=3, replace=True)["id"])
    assert by_list["state"] == by_jsonl["state"] == "done"
    assert by_list["loss"] == pytest.approx(by_jsonl["loss"], rel=1e-6)


def test_requests_are_served_unchanged_while_a_job_trains(served):
    _, engine, server = served()
    with server as base:
        want = {task: greedy(base, task) for task in (ROUTED[0], ROUTED[1], "dense-task")}
        job = start_job(base, "busy", steps=100_000)
        wait_job(base, job["id"], states=("running",))
        steps_before = engine.stats().steps
        for _ in range(3):
            assert {task: greedy(base, task) for task in want} == want
        assert engine.stats().steps > steps_before
        info = http.get(f"{base}/admin/jobs/{job['id']}", headers=ADMIN).json()
        assert info["state"] == "running" and info["step"] > 0 and info["eta_seconds"] > 0
        http.delete(f"{base}/admin/jobs/{job['id']}", headers=ADMIN)


def test_shutdown_cancels_running_jobs_and_writes_nothing(served):
    bundle_dir, engine, server = served()
    revision = mhr.Bundle.load(bundle_dir).revision
    with server as base:
        job = start_job(base, "interrupted", steps=100_000)
        wait_job(base, job["id"], states=("running",))
    assert mhr.Bundle.load(bundle_dir).revision == revision
    assert "interrupted" not in mhr.Bundle.load(bundle_dir).task_names


def test_mhr_adapt_server_follows_the_job_until_the_task_is_live(served, tmp_path):
    from typer.testing import CliRunner

    from tests.server.admin_helpers import ADMIN_KEY
    from training.cli import app

    shots = tmp_path / "shots.jsonl"
    shots.write_text("\n".join(json.dumps({"task": "cli-task", "input": e["input"], "target": e["output"]})
                               for e in EXAMPLES))
    _, _, server = served()
    runner = CliRunner()
    with server as base:
        args = ["adapt", "--server", base, "--data", str(shots), "--task", "cli-task", "--steps", "4", "--quiet"]
        result = runner.invoke(app, [*args, "--admin-key", ADMIN_KEY])
        assert result.exit_code == 0, result.output
        assert f"task 'cli-task' is live on {base}" in result.output and "4 steps" in result.output
        assert "cli-task" in [t["name"] for t in http.get(f"{base}/v1/tasks").json()["tasks"]]
        (job,) = http.get(f"{base}/admin/jobs", headers=ADMIN).json()["jobs"]
        assert job["steps"] == 4 and job["examples"] == len(EXAMPLES)
        refused = runner.invoke(app, [*args, "--admin-key", "wrong-key-0123456789"])
        assert refused.exit_code == 2 and "401" in refused.output
        taken = runner.invoke(app, [*args, "--admin-key", ADMIN_KEY])
        assert taken.exit_code == 2 and "409" in taken.output and "already exists" in taken.output
        both = runner.invoke(app, [*args, "--bundle", str(tmp_path)])
        assert both.exit_code == 2 and "exactly one of --bundle" in both.output
        local = runner.invoke(app, [*args, "--device", "cpu"])
        assert local.exit_code == 2 and "--device apply to adapting here" in local.output


def test_jobs_up_to_the_limit_train_at_once_taking_turns(served):
    bundle_dir, _, server = served(max_jobs=2, max_queued_jobs=1)
    with server as base:
        first, second = start_job(base, "one", steps=30), start_job(base, "two", steps=30)
        third = start_job(base, "three", steps=2)
        assert third["state"] == "queued"
        seen_both = False
        while not seen_both:
            jobs = {j["task"]: j for j in http.get(f"{base}/admin/jobs", headers=ADMIN).json()["jobs"]}
            if jobs["one"]["state"] == "done":
                break
            seen_both = jobs["one"]["state"] == jobs["two"]["state"] == "running" and \
                min(jobs["one"]["step"], jobs["two"]["step"]) > 0 and jobs["three"]["state"] == "queued"
        assert seen_both  # both trained before either ended, the third waiting
        ended = [wait_job(base, job["id"]) for job in (first, second, third)]
        assert [job["state"] for job in ended] == ["done"] * 3
    assert {"one", "two", "three"} <= set(mhr.Bundle.load(bundle_dir).task_names)
