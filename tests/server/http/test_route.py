"""POST /admin/tasks/{task}/route over real HTTP: a new task's routing chosen from examples without gradients,
deployed like an upload (on disk first, then served), with the examples' loss before and after."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

import mhr
from server.engine.route_search import RouteSearch, weights_to_logits
from tests.server import loopback as http
from tests.server.admin_helpers import ADMIN, admin_app, copy_bundle, engine_on
from tests.server.conftest import ROUTED
from tests.server.http.test_faults import wait_until
from tests.server.loopback import serve_app
from training.data import Example

PROMPTS = ["The quiet river copies the stone", "A small bird", "Under the old bridge", "Seven lanterns",
           "The market opens", "Wind over the field"]


@pytest.fixture
def served(tiny_llama_path, tiny_tokenizer, bundle_path, tmp_path):
    bundle_dir = copy_bundle(bundle_path, tmp_path / "bundle")
    engine = engine_on(tiny_llama_path, tiny_tokenizer, bundle_dir, max_seq_len=96)
    with serve_app(admin_app(engine, bundle_dir)) as base:
        yield base, engine, bundle_dir


EXAMPLES = [{"input": p, "output": o} for p, o in zip(PROMPTS, ["stone", "bird", "bridge", "lanterns", "market",
                                                                 "field"], strict=True)]


def answer_loss(base: str, task: str, tokenizer, example: dict) -> tuple[float, int]:
    """(sum of the answer tokens' negative log-probabilities, their number) under `task`, through the completions
    route with echo: a path of its own, not the search's."""
    prompt = tokenizer(example["input"])["input_ids"]
    answer = tokenizer(" " + example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    r = http.post(f"{base}/v1/completions", json={"model": task, "prompt": prompt + answer, "max_tokens": 0,
                                                  "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    return -sum(logprobs[-len(answer):]), len(answer)


def mean_loss(base: str, task: str, tokenizer) -> float:
    sums = [answer_loss(base, task, tokenizer, e) for e in EXAMPLES]
    return sum(s for s, _ in sums) / sum(n for _, n in sums)


def test_a_routed_task_is_chosen_deployed_and_scores_what_it_reports(served, tiny_tokenizer):
    base, engine, bundle_dir = served
    before = mean_loss(base, "new-task", tiny_tokenizer)  # the zero-shot adapter serves the name now
    r = http.post(f"{base}/admin/tasks/new-task/route", json={"examples": EXAMPLES}, headers=ADMIN)
    assert r.status_code == 201, r.text
    found = r.json()
    assert found["loss_before"] == pytest.approx(before, rel=1e-4)
    assert found["loss_after"] <= found["loss_before"] and found["evaluations"] >= len(ROUTED) + 2
    assert found["loss_after"] == pytest.approx(mean_loss(base, "new-task", tiny_tokenizer), rel=1e-3)
    best_single = min(mean_loss(base, t, tiny_tokenizer) for t in ROUTED)
    assert found["loss_after"] <= best_single + 1e-4  # no worse than the best routed task alone
    assert set(found["mixture"]) <= set(ROUTED) | {"uniform"} and sum(found["mixture"].values()) == pytest.approx(1)
    # served, listed, and on disk with its provenance (a restart serves it)
    assert "new-task" in engine.tasks and http.get(f"{base}/v1/tasks/new-task").json()["kind"] == "routed"
    on_disk = mhr.Bundle.load(bundle_dir)
    assert on_disk.task("new-task").metadata["deployed"] == "route" and found["revision"] == on_disk.revision
    assert on_disk.task("new-task").metadata["mixture"] == found["mixture"]


class Synthetic(RouteSearch):
    """The search with a loss of its own: the squared distance of a mixture's weights from `target`'s."""

    def __init__(self, engine, target, budget):
        super().__init__(engine, [Example("t", "x", "y")], budget)
        self.target = target

    async def _loss(self, task=None, mixture=None):
        self.evaluations += 1
        if mixture is None:
            return 1e9
        return sum(float(((mixture.weights[m] - self.target.weights[m]) ** 2).sum()) for m in self.target.weights)


def test_the_search_finds_a_mixture_on_the_simplex_and_a_task_alone(make_engine):
    engine = make_engine()
    names = [ROUTED[1], ROUTED[4], ROUTED[2]]
    target = engine.tasks.mixture({ROUTED[1]: 0.625, ROUTED[4]: 0.375})
    shares, loss = asyncio.run(Synthetic(engine, target, budget=48)._simplex_search(names))
    assert shares == {ROUTED[1]: 0.625, ROUTED[4]: 0.375} and loss < 1e-10
    alone = asyncio.run(Synthetic(engine, engine.tasks.mixture({ROUTED[5]: 1.0}), budget=24).run("new"))
    assert alone.mixture == {ROUTED[5]: 1.0} and alone.loss_after < 1e-10
    # the budget counts the mixtures searched, after the candidates; none: the best candidate alone
    none = asyncio.run(Synthetic(engine, target, budget=0).run("new"))
    assert len(none.mixture) == 1 and none.evaluations == len(ROUTED) + 2


def test_logits_give_back_the_weights_they_were_made_from():
    import torch

    from mhr.functional import routing_weights

    w = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert torch.allclose(routing_weights(weights_to_logits({"m": w})["m"]), w, atol=1e-5)


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"examples": []}, 400, "examples"),
    ({"examples": [{"input": "a", "output": ""}]}, 400, "examples.0.output"),
    ({"examples": [{"input": "a", "answer": "b"}]}, 400, "examples.0"),
    ({"examples": [{"input": "a", "output": "b"}], "budget": 1000}, 400, "budget"),
    ({"examples": [{"input": "word " * 200, "output": "b"}]}, 400, "examples.0"),
    ({"examples": [{"input": "a", "output": "b"}]}, 409, "task_exists"),  # the name of a served task
])
def test_bad_examples_and_names_in_use_are_refused_and_nothing_changes(served, body, status, says):
    base, engine, bundle_dir = served
    task = ROUTED[0] if status == 409 else "new-task"
    before = (bundle_dir / "manifest.json").read_bytes()
    r = http.post(f"{base}/admin/tasks/{task}/route", json=body, headers=ADMIN)
    assert r.status_code == status and says in r.text, r.text
    assert (bundle_dir / "manifest.json").read_bytes() == before and "new-task" not in engine.tasks


def test_the_route_needs_the_admin_key(served):
    base, _, _ = served
    r = http.post(f"{base}/admin/tasks/new-task/route", json={"examples": [{"input": "a", "output": "b"}]})
    assert r.status_code == 401


def test_one_search_at_a_time_a_second_gets_429(tiny_llama_path, tiny_tokenizer, bundle_path, tmp_path):
    bundle_dir = copy_bundle(bundle_path, tmp_path / "bundle")
    engine = engine_on(tiny_llama_path, tiny_tokenizer, bundle_dir, max_seq_len=96, max_running=1)
    with serve_app(admin_app(engine, bundle_dir)) as base, ThreadPoolExecutor(2) as pool:
        long = {"model": ROUTED[1], "prompt": PROMPTS[0], "max_tokens": 80, "temperature": 0}
        blocker = pool.submit(http.post, f"{base}/v1/completions", json=long)  # holds the only row
        wait_until(lambda: engine.stats().running == 1, what="the blocking request")
        first = pool.submit(http.post, f"{base}/admin/tasks/first/route", json={"examples": EXAMPLES}, headers=ADMIN)
        wait_until(lambda: engine.stats().waiting >= 1, what="the first search to score")
        second = http.post(f"{base}/admin/tasks/second/route", json={"examples": EXAMPLES}, headers=ADMIN)
        assert blocker.result().status_code == 200 and first.result().status_code == 201
    assert second.status_code == 429 and second.json()["error"]["code"] == "search_running", second.text
    assert second.headers["retry-after"] == "2"


def test_a_route_body_has_the_request_body_limit_not_the_upload_limit(served):
    """Only the upload routes stream large bodies; examples are parsed JSON, bounded like any request."""
    base, engine, _ = served
    examples = [{"input": "a" * 60_000, "output": "b"}] * 64  # ~3.8 MB, over the test server's default limit
    r = http.post(f"{base}/admin/tasks/new-task/route", json={"examples": examples}, headers=ADMIN)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
    assert "new-task" not in engine.tasks
