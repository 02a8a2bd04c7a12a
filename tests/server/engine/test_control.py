"""The engine under pressure and change: more tasks than slots, long prompts prefilled in chunks while
others decode, cancellation, the bounded queue, zero-shot policy, and tasks added, replaced and removed
while requests run."""

import logging

import pytest

from server.engine.requests import InvalidRequest, Request, SamplingParams
from server.engine.scheduler import QueueFull
from server.engine.slots import SlotsBusy
from server.engine.tasks import UnknownTask
from tests.server.conftest import DENSE, ROUTED, random_logits, random_lora
from tests.server.engine.test_core import GREEDY, prompt, run_alone

LONG = SamplingParams(max_new_tokens=30, ignore_eos=True)


def task_requests(tokenizer, tasks, params=GREEDY):
    return [Request(prompt(tokenizer, 3 + i % 5, i % 3), t, params) for i, t in enumerate(tasks)]


def test_more_tasks_than_slots_all_complete_correctly(make_engine, tiny_tokenizer):
    tasks = [*ROUTED, DENSE] * 2                     # 7 tasks, 14 requests
    requests = task_requests(tiny_tokenizer, tasks)
    want = run_alone(make_engine(), requests)
    engine = make_engine(n_slots=5)                  # slot 0, the zero-shot pin, 3 for 7 tasks
    written = []

    def guarded_write(items, write=engine.slots.write_many):
        running = {s.slot for s in engine.batch.seqs}
        assert not running & {slot for slot, _ in items}, "a slot read by a running request was overwritten"
        written.extend(slot for slot, _ in items)
        write(items)

    engine.cache._write = guarded_write
    pinned_misses = engine.cache.stats.misses          # the zero-shot adapter, loaded at start
    results = engine.generate(requests)
    assert [r.tokens for r in results] == [w.tokens for w in want]
    stats = engine.cache.stats
    assert stats.lookups == stats.hits + stats.misses + stats.waits
    assert stats.misses - pinned_misses == len(written) >= len(set(tasks))
    assert stats.evictions == len(written) - 3        # the first three misses found free slots
    assert stats.waits > 0                           # some requests had to wait for a slot
    assert all(engine.cache.refs(s) == 0 for s in range(2, 5)) and engine.cache.refs(1) == 1  # only the pin


def test_cold_tasks_admitted_together_are_written_in_one_call_with_the_tokens_of_each_alone(make_engine,
                                                                                           tiny_tokenizer):
    tasks = [*ROUTED[:5], DENSE, ROUTED[0]]              # six tasks for the six free slots
    requests = task_requests(tiny_tokenizer, tasks)
    want = run_alone(make_engine(), requests)                # each task materialized alone
    engine = make_engine()
    calls = []

    def recorded_write(items, write=engine.slots.write_many):
        calls.append(sorted(slot for slot, _ in items))
        write(items)

    engine.cache._write = recorded_write
    results = engine.generate(requests)
    assert [r.tokens for r in results] == [w.tokens for w in want]
    slots = {engine.cache.slot_of(engine.tasks.resolve(t)) for t in tasks}
    assert calls == [sorted(slots)] and len(slots) == len(set(tasks))  # one burst, each task once


def test_slots_resized_while_requests_run_keep_every_output(make_engine, tiny_tokenizer):
    tasks = [*ROUTED[:4], DENSE] * 2                 # 5 tasks, 10 requests
    requests = task_requests(tiny_tokenizer, tasks)
    want = [r.tokens for r in run_alone(make_engine(), requests)]
    engine = make_engine(n_slots=4)                  # two task slots for five tasks: requests wait
    handles = [engine.submit(r) for r in requests]
    engine.step()
    assert engine.cache.stats.waits > 0
    engine.resize_slots(9)                           # grown mid-run: the waiting tasks get the new slots
    while engine.has_work:
        engine.step()
    assert [h.result().tokens for h in handles] == want
    assert engine.stats().slots == 9 and engine.slots.groups[0].A.shape[1] == 9
    engine.resize_slots(3)                           # every task idle: the dropped slots' adapters are evicted
    assert set(engine.cache.resident().values()) <= {1, 2}
    assert [r.tokens for r in engine.generate(requests)] == want  # materialized again, one slot at a time
    engine.resize_slots(5)
    running = [engine.submit(r) for r in requests[:2]]  # two tasks: the new slots 3 and 4
    engine.step()
    with pytest.raises(SlotsBusy, match="slots \\[3, 4\\] are in use.*keep at least 5"):
        engine.resize_slots(3)
    with pytest.raises(ValueError, match="n_slots must be an integer >= 3"):
        engine.resize_slots(2)
    assert engine.stats().slots == 5
    while engine.has_work:
        engine.step()
    assert [h.result().tokens for h in running] == want[:2]


def test_running_requests_decode_while_a_long_prompt_is_prefilled_in_chunks(make_engine, tiny_tokenizer):
    engine = make_engine(max_prefill_tokens=4)
    short = engine.submit(Request(prompt(tiny_tokenizer, 1), ROUTED[0], LONG))
    engine.step()  # its prefill's first token
    long_prompt = prompt(tiny_tokenizer, 12)
    chunks = -(-len(long_prompt) // 4)
    assert chunks >= 3
    long = engine.submit(Request(long_prompt, ROUTED[3], GREEDY))
    seen = []
    for _ in range(chunks):
        engine.step()
        seen.append((len(engine.batch.seqs[0].tokens), engine.kv.n_active))
    # the short request gained a token every step; the long one took a KV row with its last chunk only
    assert [tokens for tokens, _ in seen] == list(range(2, 2 + chunks))
    assert [rows for _, rows in seen] == [1] * (chunks - 1) + [2]
    assert len(engine.batch.seqs[1].tokens) == 1 and not long.done and not short.done  # its first token
    while not (long.done and short.done):
        engine.step()
    assert long.result().tokens == run_alone(make_engine(), [Request(long_prompt, ROUTED[3], GREEDY)])[0].tokens


def test_short_prompts_start_beside_a_long_prompt_prefilled_in_chunks(make_engine, tiny_tokenizer):
    """Prompts that fit in half the step's budget start while a long prompt is prefilled in chunks (in the
    same forward); its chunk takes the rest of the budget, so it goes on every step. A row stays kept for it."""
    engine = make_engine(max_prefill_tokens=12, max_running=3)
    long_prompt = prompt(tiny_tokenizer, 14)
    assert len(long_prompt) > 24
    long = engine.submit(Request(long_prompt, ROUTED[3], GREEDY))
    engine.step()                                       # its first chunk: 12 positions
    shorts = [Request(prompt(tiny_tokenizer, 1, i), task, GREEDY)
              for i, task in zip([0, 2, 3], [ROUTED[0], DENSE, None], strict=True)]
    assert [len(r.prompt) for r in shorts] == [2, 4, 4]
    handles = [engine.submit(r) for r in shorts]
    engine.step()                                       # two start: 6 tokens, half the budget; the chunk gets 6
    assert [len(s.tokens) for s in engine.batch.seqs] == [1, 1] and engine.kv.n_active == 2
    assert engine._staged_len == 12 + 6 and engine.scheduler.n_waiting == 1
    engine.step()                                       # the long prompt's last chunk; no row left for the third
    assert engine._staged is None and [len(s.tokens) for s in engine.batch.seqs] == [2, 2, 1]
    assert engine.scheduler.n_waiting == 1
    while not long.done:
        engine.step()
    while engine.has_work:
        engine.step()
    assert long.result().tokens == run_alone(make_engine(), [Request(long_prompt, ROUTED[3], GREEDY)])[0].tokens
    assert [h.result().tokens for h in handles] == [r.tokens for r in run_alone(make_engine(), shorts)]


def test_cancelling_a_prompt_prefilled_in_chunks_frees_its_slot(make_engine, tiny_tokenizer):
    engine = make_engine(max_prefill_tokens=2)
    request = Request(prompt(tiny_tokenizer, 8), ROUTED[2], GREEDY)
    handle = engine.submit(request)
    engine.step()
    slot = engine.cache.slot_of(engine.tasks.resolve(ROUTED[2]))
    assert engine.cache.refs(slot) == 1 and engine.has_work and engine.stats().running == 1
    assert engine.cancel(request.request_id)
    assert engine.cache.refs(slot) == 0 and not engine.has_work and engine.kv.n_active == 0
    result = handle.result(timeout=0)
    assert result.finish_reason == "cancelled" and result.tokens == []
    after = engine.generate([Request(request.prompt, ROUTED[2], GREEDY)])[0]  # the staging row is reusable
    assert after.tokens == run_alone(make_engine(), [request])[0].tokens


@pytest.mark.parametrize("fault", ["forward", "slot write"])
def test_a_failed_step_ends_its_requests_with_an_error_and_the_engine_serves_on(make_engine, tiny_tokenizer, fault,
                                                                               caplog):
    engine = make_engine(max_prefill_tokens=20)
    requests = task_requests(tiny_tokenizer, [ROUTED[0], DENSE], LONG)
    handles = [engine.submit(r) for r in requests]
    while len(engine.batch) < 2:
        engine.step()
    long = engine.submit(Request(prompt(tiny_tokenizer, 12), None, GREEDY))    # staged: prefilled in chunks
    engine.step()
    assert engine._staged is not None
    cold = engine.submit(Request(prompt(tiny_tokenizer, 1), ROUTED[3], GREEDY))  # a miss, admitted next step

    def broken(*args):
        raise RuntimeError("out of memory")
    healthy = engine.lean, engine.cache._write
    engine.lean, engine.cache._write = (broken, healthy[1]) if fault == "forward" else (healthy[0], broken)
    with caplog.at_level(logging.ERROR, logger="server.engine.core"):
        engine.step()                                 # does not raise
    engine.lean, engine.cache._write = healthy
    for handle in [*handles, long, cold]:
        result = handle.result(timeout=0)  # the exception's text is logged, with the request's id, not handed out
        assert result.finish_reason == "error" and "step failed" in result.error and "memory" not in result.error
        assert handle.request_id in caplog.text
    assert "out of memory" in caplog.text
    assert engine.stats().running == 0 and engine.kv.n_active == 0 and not engine.has_work
    assert all(engine.cache.refs(slot) == 0 for slot in engine.cache.resident().values()
               if slot != engine._zero_shot_slot)
    again = engine.generate(requests)
    assert [r.tokens for r in again] == [r.tokens for r in run_alone(make_engine(), requests)]


def test_cancel_mid_generation_frees_slot_and_kv_row(make_engine, tiny_tokenizer):
    engine = make_engine()
    requests = task_requests(tiny_tokenizer, [ROUTED[0], ROUTED[3], ROUTED[0]], LONG)
    want = run_alone(make_engine(), requests)
    handles = [engine.submit(r) for r in requests]
    for _ in range(4):
        engine.step()
    slot = engine.cache.slot_of(engine.tasks.resolve(ROUTED[3]))
    assert engine.kv.n_active == 3 and engine.cache.refs(slot) == 1
    assert engine.cancel(requests[1].request_id)
    assert engine.kv.n_active == 2 and len(engine.batch) == 2 and engine.cache.refs(slot) == 0
    cancelled = handles[1].result(timeout=0)
    assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.tokens) < LONG.max_new_tokens
    assert cancelled.tokens == want[1].tokens[: len(cancelled.tokens)]
    assert not engine.cancel(requests[1].request_id)  # already gone
    while not all(h.done for h in handles):
        engine.step()
    assert [handles[i].result().tokens for i in (0, 2)] == [want[0].tokens, want[2].tokens]
    assert engine.kv.n_active == 0 and engine.cache.refs(engine.cache.slot_of(engine.tasks.resolve(ROUTED[0]))) == 0


def test_cancel_while_waiting(make_engine, tiny_tokenizer):
    engine = make_engine(max_running=1)
    first, second = task_requests(tiny_tokenizer, [ROUTED[0], ROUTED[1]], LONG)
    engine.submit(first), engine.step()
    handle = engine.submit(second)
    assert engine.cancel(second.request_id) and engine.scheduler.n_waiting == 0
    assert handle.result(timeout=0).finish_reason == "cancelled"


def test_full_queue_fails_fast_with_its_own_error(make_engine, tiny_tokenizer):
    engine = make_engine(max_waiting=2)
    requests = task_requests(tiny_tokenizer, ROUTED[:3])
    engine.submit(requests[0]), engine.submit(requests[1])
    with pytest.raises(QueueFull):
        engine.submit(requests[2])
    engine.step()                                     # both admitted: the queue has room again
    engine.submit(requests[2])


def test_requests_that_can_never_run_are_refused(make_engine, tiny_tokenizer):
    engine = make_engine(max_seq_len=20)
    with pytest.raises(InvalidRequest, match="max_seq_len"):
        engine.submit(Request(prompt(tiny_tokenizer, 5), ROUTED[0], SamplingParams(max_new_tokens=19)))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.submit(Request([], ROUTED[0]))


def test_zero_shot_policy(make_engine, tiny_tokenizer):
    request = Request(prompt(tiny_tokenizer, 4), "unseen-task", GREEDY)
    assert make_engine().generate([request])[0].adapter == "zero-shot"
    strict = make_engine(allow_zero_shot=False)
    with pytest.raises(UnknownTask, match="unseen-task"):
        strict.submit(Request(prompt(tiny_tokenizer, 4), "unseen-task", GREEDY))
    assert strict.cache.resident() == {}              # nothing pinned without the policy


def test_unknown_task_error_names_a_few_of_many_tasks(make_engine):
    engine = make_engine(allow_zero_shot=False)
    logits = engine.tasks.bundle.routing_logits(ROUTED[0])
    for i in range(40):
        engine.tasks.put_routed(f"extra-{i:02d}", logits)
    with pytest.raises(UnknownTask) as error:
        engine.tasks.resolve("nope")
    shown = str(error.value)  # the fixture's tasks first, 20 names in all, then the count
    assert ROUTED[0] in shown and "extra-39" not in shown
    assert shown.endswith(f"... ({len(engine.tasks)} in all))") and shown.count(", ") == 20


def test_replace_task_while_running(make_engine, tiny_tokenizer):
    engine = make_engine()
    old_request = Request(prompt(tiny_tokenizer, 5), ROUTED[2], LONG)
    old_want = run_alone(make_engine(), [old_request])[0].tokens
    handle = engine.submit(old_request)
    engine.step()
    old_key = engine.tasks.resolve(ROUTED[2])
    engine.put_task(ROUTED[2], logits=random_logits(engine.tasks.bundle, seed=99))
    new_request = Request(old_request.prompt, ROUTED[2], LONG)
    new_handle = engine.submit(new_request)
    engine.step()
    assert old_key in engine.cache.resident()         # still read by the running request
    while not (handle.done and new_handle.done):
        engine.step()
    assert handle.result().tokens == old_want         # finished on the old weights
    new_tokens = new_handle.result().tokens
    assert new_tokens != old_want
    assert old_key not in engine.cache.resident()     # freed at its last release

    fresh = make_engine()
    fresh.put_task(ROUTED[2], logits=random_logits(fresh.tasks.bundle, seed=99))
    assert fresh.generate([Request(old_request.prompt, ROUTED[2], LONG)])[0].tokens == new_tokens


def test_add_and_remove_tasks_while_running(make_engine, tiny_tokenizer):
    engine = make_engine(allow_zero_shot=False)
    running = Request(prompt(tiny_tokenizer, 5), ROUTED[4], LONG)
    want = run_alone(make_engine(), [running])[0].tokens
    handle = engine.submit(running)
    engine.step()
    engine.put_task("added", lora=random_lora(engine.tasks.bundle, rank=3, seed=5))
    added = engine.submit(Request(prompt(tiny_tokenizer, 3), "added", GREEDY))
    key = engine.tasks.resolve(ROUTED[4])
    engine.remove_task(ROUTED[4])
    with pytest.raises(UnknownTask):
        engine.submit(Request(prompt(tiny_tokenizer, 3), ROUTED[4], GREEDY))
    while not (handle.done and added.done):
        engine.step()
    assert handle.result().tokens == want
    assert added.result().adapter == "added" and len(added.result().tokens) == GREEDY.max_new_tokens
    assert key not in engine.cache.resident() and ROUTED[4] not in engine.tasks.task_names


def test_task_removed_while_waiting_fails_that_request(make_engine, tiny_tokenizer):
    engine = make_engine(max_running=1, allow_zero_shot=False)
    first, second = task_requests(tiny_tokenizer, [ROUTED[0], ROUTED[1]], GREEDY)
    engine.submit(first), engine.step()
    handle = engine.submit(second)
    engine.remove_task(ROUTED[1])
    while not handle.done:
        engine.step()
    result = handle.result()
    assert result.finish_reason == "error" and ROUTED[1] in result.error


def test_too_large_rank_is_refused(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidRequest, match="max rank"):
        engine.put_task("big", lora=random_lora(engine.tasks.bundle, rank=7, seed=2))
    assert "big" not in engine.tasks.task_names


def test_replace_bundle_while_running(make_engine, tiny_tokenizer, bundle_path):
    import mhr

    engine = make_engine()
    running = Request(prompt(tiny_tokenizer, 5), ROUTED[1], LONG)
    want = run_alone(make_engine(), [running])[0].tokens
    handle = engine.submit(running)
    engine.step()
    old_keys = set(engine.cache.resident())
    bundle = mhr.Bundle.load(bundle_path)
    bundle.add_routed_task(ROUTED[1], random_logits(bundle, seed=7), replace=True)
    engine.replace_bundle(bundle)
    fresh = engine.submit(Request(running.prompt, ROUTED[1], LONG))
    while not (handle.done and fresh.done):
        engine.step()
    assert handle.result().tokens == want and fresh.result().tokens != want
    assert not old_keys & set(engine.cache.resident())  # every old adapter freed, the old pin included
    assert engine.tasks.zero_shot_key in engine.cache.resident()


def test_stats_snapshot(make_engine, tiny_tokenizer):
    engine = make_engine()
    engine.generate(task_requests(tiny_tokenizer, [ROUTED[0], ROUTED[1], ROUTED[0]]))
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.slots, stats.tasks) == (0, 0, 8, len(ROUTED) + 1)
    assert stats.slots_in_use == 3 and stats.cache.misses == 3 and stats.cache.hits == 1
    assert stats.steps == GREEDY.max_new_tokens and stats.batch_rows == 3 * GREEDY.max_new_tokens


def test_work_held_between_steps_lets_waiting_requests_run_when_it_yields(make_engine, tiny_tokenizer):
    """An adaptation job holds the engine between steps; where it yields, the requests that came meanwhile run
    to the end (within the time given), and the job holds the engine again afterwards."""
    import asyncio
    import threading

    engine = make_engine()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    serving = asyncio.run_coroutine_threadsafe(engine.serve(), loop)
    try:
        with engine.between_steps():
            request = Request(prompt(tiny_tokenizer, 6), ROUTED[0], GREEDY)
            handle = engine.submit(request)
            engine.yield_to_steps(0.0)  # no time given: nothing runs
            assert engine.stats().steps == 0 and not handle.done
            engine.yield_to_steps(30.0)
            assert handle.done  # every step of the request ran while the holder yielded
            steps = engine.stats().steps
            other = engine.submit(Request(prompt(tiny_tokenizer, 4), ROUTED[1], GREEDY))
            threading.Event().wait(0.2)
            assert engine.stats().steps == steps and not other.done  # held again: no step runs
        assert other.result(timeout=30).finish_reason == "length"  # released: it runs
        assert handle.result().tokens == run_alone(make_engine(), [request])[0].tokens
    finally:
        serving.cancel()
        loop.call_soon_threadsafe(loop.stop)
