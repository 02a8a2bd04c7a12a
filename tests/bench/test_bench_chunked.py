"""The long-prompt benchmark's round on a small backbone: it runs to both prompts' first tokens with the
other requests decoding, in one step or in chunks (the short prompt starting beside a chunk when it fits in
half the budget), and leaves the engine empty for the next round."""

from __future__ import annotations

import pytest

from bench.bench_chunked import RUNNING, SHORT, engine_with_budget, long_prompt_round
from bench.workload import build


@pytest.mark.parametrize("budget", [48, 2 * SHORT, 4])
def test_a_round_ends_with_both_prompts_decoding_and_leaves_nothing_behind(tmp_path, budget):
    w = build(tmp_path, shape="small", n_prompts=RUNNING + 2, new_tokens=6)
    long = list(range(5, 45))
    engine = engine_with_budget(w, budget, len(long))
    for _ in range(2):
        longest_step, long_first, short_first = long_prompt_round(engine, w, long)
        assert 0 < longest_step <= long_first
        if budget == 2 * SHORT:  # its first chunk alone, then the short prompt beside the second
            assert short_first < long_first
        else:                    # after the whole long prompt's step; or too long to start beside chunks of 4
            assert short_first > long_first
        assert not engine.has_work and engine.kv.n_active == 0 and engine.stats().running == 0
