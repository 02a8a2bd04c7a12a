"""The prefix benchmark's own checks: both engines run every round to the same tokens, and the cached one skips
the whole blocks of each task's prefix in every timed round."""

from bench.bench_prefix import PER_TASK, TASKS, compare
from bench.workload import build


def test_the_cached_engine_skips_each_prompts_whole_prefix_blocks_with_the_same_tokens(tmp_path):
    medians, reused = compare(build(tmp_path, shape="small", n_prompts=TASKS), prefix=40, question=3, rounds=2)
    assert reused == 2 * TASKS * PER_TASK * 32   # two whole blocks of 16 of the 40-token prefix, every request
    assert all(seconds > 0 and ttft > 0 for seconds, ttft in medians.values())
