"""Per-request skill mixing: interpolated tasks and explicit per-head skill weights, served on the fly.

The reference for a mixture is a second code path: mhr.SkillInventory materializes the mixture into an
ordinary LoRA, which an engine serves as a dense task.
"""

from __future__ import annotations

import pytest
import torch

import mhr
from server.engine.requests import Request, SamplingParams
from server.engine.tasks import Mixture
from tests.server import loopback as http
from tests.server.conftest import DENSE, ROUTED

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
PROMPT = "The quiet river copies the stone"


def served_as_dense(make_engine, tokenizer, weights):
    """Tokens of an engine serving the LoRA that mhr materializes from `weights` ([h, K] per module)."""
    engine = make_engine()
    bundle = engine.tasks.bundle
    lora = bundle.inventory().materialize(weights)
    engine.put_task("reference", lora=lora)
    (result,) = engine.generate([Request(tokenizer(PROMPT).input_ids, "reference", GREEDY)])
    return result.tokens


def test_a_mix_of_tasks_serves_the_weighted_routing(make_engine, tiny_tokenizer):
    engine = make_engine()
    bundle = engine.tasks.bundle
    a, b = bundle.routing_logits(ROUTED[0]), bundle.routing_logits(ROUTED[1])
    weights = {m: 0.7 * mhr.routing_weights(a[m]) + 0.3 * mhr.routing_weights(b[m]) for m in bundle.modules}
    (mixed,) = engine.generate([Request(tiny_tokenizer(PROMPT).input_ids, "anything", GREEDY,
                                        mixture=Mixture.of(weights))])
    assert mixed.tokens == served_as_dense(make_engine, tiny_tokenizer, weights)
    assert mixed.adapter.startswith("mix-")
    alone = [engine.generate([Request(tiny_tokenizer(PROMPT).input_ids, t, GREEDY)])[0].tokens for t in ROUTED[:2]]
    assert mixed.tokens not in alone, "the mixture should be neither task"


def test_explicit_skill_weights(make_engine, tiny_tokenizer):
    engine = make_engine()
    bundle = engine.tasks.bundle
    h, K = bundle.config.n_heads, bundle.config.n_skills
    one_hot = torch.zeros(h, K)
    one_hot[:, 2] = 1.0  # every head uses skill 2 only
    (result,) = engine.generate([Request(tiny_tokenizer(PROMPT).input_ids, None, GREEDY,
                                         mixture=Mixture.of({m: one_hot for m in bundle.modules}))])
    assert result.tokens == served_as_dense(make_engine, tiny_tokenizer, one_hot)


def test_equal_mixtures_share_a_name_and_a_slot(make_engine):
    engine = make_engine()
    weights = {m: torch.full((2, 4), 0.25) for m in engine.tasks.bundle.modules}
    first, again = Mixture.of(weights), Mixture.of({m: w.clone() for m, w in weights.items()})
    assert first.name == again.name
    other = Mixture.of({m: torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]) for m in weights})
    assert other.name != first.name
    requests = [Request([1, 5, 6], None, GREEDY, mixture=m) for m in (first, again)]
    engine.generate(requests[:1])
    misses = engine.stats().cache.misses
    engine.generate(requests[1:])
    assert engine.stats().cache.misses == misses, "the same mixture is served from its slot"


def test_mixing_over_http_with_the_openai_client(server, client, make_engine, tiny_tokenizer):
    out = client.completions.create(model=ROUTED[0], prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"mhr": {"mix": {ROUTED[0]: 0.7, ROUTED[1]: 0.3}}})
    bundle = make_engine().tasks.bundle
    a, b = bundle.routing_logits(ROUTED[0]), bundle.routing_logits(ROUTED[1])
    weights = {m: 0.7 * mhr.routing_weights(a[m]) + 0.3 * mhr.routing_weights(b[m]) for m in bundle.modules}
    assert out.model_extra["mhr"]["adapter"] == Mixture.of(weights).name
    engine = make_engine()
    engine.put_task("reference", lora=bundle.inventory().materialize(weights))
    (expected,) = engine.generate([Request(tiny_tokenizer(PROMPT).input_ids, "reference",
                                           SamplingParams(max_new_tokens=8))])
    assert out.choices[0].text == expected.text
    metrics = http.get(f"{server}/metrics").text
    assert 'adapter="mix"' in metrics and "mix-" not in metrics  # one label for every mixture


@pytest.mark.parametrize("mhr_field, says", [
    ({"mix": {"no-such-task": 1}}, "not in the bundle"),
    ({"mix": {DENSE: 1}}, "only routed tasks"),
    ({"mix": {ROUTED[0]: 0, ROUTED[1]: 0}}, "all zero"),
    ({"mix": {ROUTED[0]: -1}}, "greater than or equal to 0"),
    ({"skills": [[1, 0, 0, 0]]}, "2 rows"),
    ({"skills": [[1, 0, 0], [0, 1, 0]]}, "2 rows"),
    ({"skills": [[0, 0, 0, 0], [1, 0, 0, 0]]}, "all zero"),
    ({"mix": {ROUTED[0]: 1}, "skills": [[1, 0, 0, 0], [1, 0, 0, 0]]}, "exactly one"),
    ({}, "exactly one"),
])
def test_bad_mixtures_are_refused_with_a_400(server, mhr_field, says):
    r = http.post(f"{server}/v1/completions", json={"model": ROUTED[0], "prompt": PROMPT, "mhr": mhr_field})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
