"""The engine benchmark's ratios, from made-up timings whose ratios are known by hand."""

import pytest

from bench.bench_engine import ratios

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
