"""The engine benchmark's ratios, from made-up timings whose ratios are known by hand, what its cold-task
timing leaves in the slot it writes, that its in-serving cold-task timings time every task cold (one a
step, or all in one step), the size of the memory read it compares them with, and what the cold-burst
benchmark leaves in the slots it writes."""

import pytest
import torch

import mhr
from bench.bench_cold import burst_ms
from bench.bench_engine import (
    cold_burst_serving_ms,
    cold_task_ms,
    cold_task_serving_ms,
    engine_for,
    inventory_read_ms,
    ratios,
)
from bench.workload import build

SECONDS = {"engine, 16 tasks": 3.0, "engine, 1 task": 2.5, "engine, no adapter": 2.0, "HF generate, bare": 6.0,
           "PEFT mixed batch": 12.0, "PEFT set_adapter switching": 30.0}


def test_ratios_are_speedups_and_time_overheads():
    got = {name: value for name, value, _ in ratios(SECONDS, "engine")}
    assert got["engine 16 tasks / HF generate bare"] == pytest.approx(2.0)      # 6 s vs 3 s for the same tokens
    assert got["engine 16 tasks / PEFT mixed batch"] == pytest.approx(4.0)
    assert got["engine 16 tasks / PEFT switching"] == pytest.approx(10.0)
    assert got["engine mixed / single-task batch"] == pytest.approx(2.5 / 3.0)   # tokens/s: below 1 when slower
    assert got["engine LoRA time / no adapter, 16 tasks"] == pytest.approx(1.5)  # time: above 1 when slower
    assert got["engine LoRA time / no adapter, 1 task"] == pytest.approx(1.25)
    assert got["engine no adapter / HF generate bare"] == pytest.approx(3.0)


def test_switching_may_be_skipped():
    seconds = {k: v for k, v in SECONDS.items() if "switching" not in k}
    got = {name: value for name, value, _ in ratios(seconds, "engine")}
    assert got["engine 16 tasks / PEFT switching"] != got["engine 16 tasks / PEFT switching"]  # NaN: not run


@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_cold_task_measures_the_whole_materialization_into_a_slot(tmp_path, cpu_kernel):
    """After the timed loop, the slot it writes holds the last task's adapter, as mhr materializes it."""
    w = build(tmp_path, shape="small", n_prompts=3)
    engine = engine_for(w, 4, max_rank=16, cpu_kernel=cpu_kernel)
    assert all(ms > 0 for ms in cold_task_ms(engine, w))
    want = mhr.Bundle.load(w.bundle_dir).task_lora(w.tasks[-1])
    for group in engine.slots.groups:
        for i, name in enumerate(group.names):
            assert torch.allclose(group.A[i, 2, :, :8], want.A[name], atol=1e-6)
            assert torch.allclose(group.B[i, 2, :8], want.B[name] * want.scaling, atol=1e-6)
            assert not group.A[i, 2, :, 8:].any() and not group.B[i, 2, 8:].any()


def test_cold_tasks_while_serving_are_each_one_miss_admitted_between_steps(tmp_path):
    w = build(tmp_path, shape="small", n_prompts=3, new_tokens=4)
    engine = engine_for(w, 3)  # two usable slots for three tasks: misses, evictions and waits on the way
    for _ in range(2):  # the second time round, the tasks the first left in slots are evicted before asked for
        before = engine.cache.stats.misses
        times = cold_task_serving_ms(engine, w)
        assert len(times) == 3 == engine.cache.stats.misses - before and all(ms > 0 for ms in times)
        assert not engine.has_work and not engine.batch


def test_a_burst_while_serving_materializes_every_task_in_its_first_step(tmp_path):
    w = build(tmp_path, shape="small", n_prompts=3, new_tokens=4)
    engine = engine_for(w, 5)
    calls = []
    engine.cache._write = lambda items, write=engine.cache._write: (calls.append(len(items)), write(items))
    for _ in range(2):  # the second time, the tasks the first left in slots are evicted first
        before = engine.cache.stats.misses
        assert cold_burst_serving_ms(engine, w) > 0
        assert engine.cache.stats.misses - before == 3 and calls[-1] == 3
        assert not engine.has_work and not engine.batch
    assert calls == [3, 3]


@pytest.mark.parametrize("together", [False, True])
def test_cold_burst_timing_writes_every_task_into_its_slot(tmp_path, together):
    w = build(tmp_path, shape="small", n_prompts=3)
    engine = engine_for(w, 5)
    assert burst_ms(engine, w.tasks, together) > 0
    bundle = mhr.Bundle.load(w.bundle_dir)
    for slot, task in enumerate(w.tasks, start=2):
        want = bundle.task_lora(task)
        for group in engine.slots.groups:
            for i, name in enumerate(group.names):
                assert torch.allclose(group.A[i, slot], want.A[name], atol=1e-6)
                assert torch.allclose(group.B[i, slot], want.B[name] * want.scaling, atol=1e-6)


def test_the_memory_floor_reads_as_many_bytes_as_the_skill_inventory_holds(tmp_path):
    w = build(tmp_path, shape="small", n_prompts=2)
    bundle = mhr.Bundle.load(w.bundle_dir)
    skills = sum(t.numel() for t in (*bundle.lora_A.values(), *bundle.lora_B.values()))  # float32 here
    mib, ms = inventory_read_ms(engine_for(w, 4))
    assert mib == pytest.approx(skills * 4 / 2**20) and ms > 0
