"""The long-prompt benchmark's round on a small backbone: it runs to the long prompt's first token with the
other requests decoding, in one step or in chunks, and leaves the engine empty for the next round."""

from __future__ import annotations

import pytest

from bench.bench_chunked import RUNNING, engine_with_budget, long_prompt_round
from bench.workload import build


@pytest.mark.parametrize("budget", [24, 4])
def test_a_round_ends_with_the_long_prompt_decoding_and_leaves_nothing_behind(tmp_path, budget):
    w = build(tmp_path, shape="small", n_prompts=RUNNING + 1, new_tokens=6)
    long = list(range(5, 25))
    engine = engine_with_budget(w, budget, len(long))
    for _ in range(2):
        longest_step, first_token = long_prompt_round(engine, w, long)
        assert 0 < longest_step <= first_token
        assert not engine.has_work and engine.kv.n_active == 0 and engine.stats().running == 0
