"""The arrivals benchmark's round on a small backbone: both settings serve every request its tokens (the same
tokens, equal to each request run alone), admit a prompt on the steps they say, and leave the engine empty."""

from __future__ import annotations

from bench.bench_arrivals import ForwardPerPart, arrivals_round, engine_of
from bench.workload import build
from server.engine.core import Engine
from server.engine.requests import Request, SamplingParams


def test_both_settings_give_each_request_its_tokens_alone_and_leave_nothing_behind(tmp_path):
    w = build(tmp_path, shape="small", n_prompts=4, new_tokens=6)
    alone = [engine_of(Engine, w).generate([Request(p, t, SamplingParams(max_new_tokens=6, ignore_eos=True))])[0]
             .tokens for p, t in zip(w.prompts, w.tasks, strict=True)]
    for cls in (Engine, ForwardPerPart):
        engine = engine_of(cls, w)
        for _ in range(2):
            total, admitting, ttft, tokens = arrivals_round(engine, w, every=2)
            assert tokens == alone
            assert 0 < admitting and 0 < ttft < total * 1e3
            assert not engine.has_work and engine.kv.n_active == 0 and engine.stats().running == 0
        assert engine.stats().steps == 2 * (2 * 3 + 6)  # arrivals at steps 0, 2, 4, 6; the last runs 6 steps
