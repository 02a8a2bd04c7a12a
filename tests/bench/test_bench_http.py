"""The HTTP load generator's workload builder and statistics, on tiny cases (no server, no timing)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_http import ROUTES, Call, Sample, build_workload, percentile, summarize, table


def test_workload_mixes_every_task_route_and_streaming_deterministically():
    tasks = ["a", "b", "c", "zero"]
    calls = build_workload(tasks, 24, max_tokens=5, stream_every=3)
    assert len(calls) == 24 and calls == build_workload(tasks, 24, max_tokens=5, stream_every=3)
    assert [c.task for c in calls[:5]] == ["a", "b", "c", "zero", "a"]  # neighbours hit different adapters
    assert {c.task for c in calls} == set(tasks) and {c.route for c in calls} == set(ROUTES)
    assert sum(c.stream for c in calls) == 8 and all(c.max_tokens == 5 for c in calls)
    assert build_workload(tasks, 0, 5) == []
    with pytest.raises(ValueError):
        build_workload([], 3, 5)


def test_calls_become_requests_of_their_route():
    path, body = Call("generate", "t1", "hi", stream=True, max_tokens=3).http()
    assert path == "/v1/tasks/t1/generate" and body == {"inputs": "hi", "max_new_tokens": 3, "temperature": 0,
                                                         "stream": True}
    path, body = Call("chat", "t1", "hi", stream=False, max_tokens=3).http()
    assert path == "/v1/chat/completions" and body["messages"] == [{"role": "user", "content": "hi"}]
    path, body = Call("completions", "t1", "hi", stream=True, max_tokens=3).http()
    assert path == "/v1/completions" and body["prompt"] == "hi" and body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 1, 101)),
                                    list(np.random.default_rng(0).exponential(size=37))])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([1.0, 3.0], 50) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_counts_add_up_and_ignore_failed_latencies():
    samples = [Sample(200, 0.1, tokens=4), Sample(200, 0.3, first_token=0.05, tokens=6), Sample(429, 9.0),
               Sample(0, 5.0), Sample(200, 0.2, first_token=0.07, tokens=2)]
    s = summarize(16, samples, seconds=2.0)
    assert (s.clients, s.sent, s.ok, s.errors) == (16, 5, 3, 2) and s.ok + s.errors == s.sent
    assert s.requests_per_s == 1.5 and s.tokens_per_s == 6.0
    assert s.p50 == pytest.approx(0.2) and s.p99 == pytest.approx(0.298)
    assert s.ttft_p50 == pytest.approx(0.06) and s.ttft_p99 == pytest.approx(0.0698)
    empty = summarize(1, [], seconds=0.0)
    assert (empty.sent, empty.ok, empty.requests_per_s, empty.p50) == (0, 0, 0.0, None)
    lines = table([s, empty]).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 16 | 5 | 2 | 1.5 | 6 | 200.0 |") and "–" in lines[3]
