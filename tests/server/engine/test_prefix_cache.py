"""The prefix cache: the longest cached whole-block prefix of a prompt under the same adapter, LRU within a byte
budget; and the engine reusing it: tokens equal PEFT's greedy tokens and an engine without the cache, prompts
with and without a cached prefix prefilled together, adapters (and task versions) never sharing prefixes."""

import pytest
import torch

from server.engine.prefix_cache import PrefixCache
from server.engine.requests import Request, SamplingParams
from server.http.app import create_app
from tests.server import loopback as http
from tests.server.conftest import DENSE, ROUTED, random_logits
from tests.server.engine.test_core import peft_greedy
from tests.server.loopback import serve_app

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
SHARED = list(range(5, 45))  # 40 tokens: two whole blocks of 16 and a part


def fake_read(prompt):
    """What a KV cache row holding `prompt` gives back: one layer, keys = the token ids, values = their negatives."""
    def read(length):
        t = torch.tensor(prompt[:length], dtype=torch.float32).view(1, length, 1)
        return [t.clone()], [-t.clone()]
    return read


def test_lookup_finds_the_longest_whole_block_prefix_under_the_same_adapter():
    cache = PrefixCache(max_bytes=10**6, block=4)
    first = list(range(11))                              # blocks [0..3], [4..7]; 8..10 a part, not kept
    cache.store("a", first, fake_read(first))
    (keys, values), length = cache.lookup("a", list(range(10)) + [99])
    assert length == 8 and keys[0].flatten().tolist() == list(range(8)) and values[0].flatten().tolist()[-1] == -7
    assert cache.lookup("a", list(range(8)))[1] == 4     # at least one token left to prefill
    assert cache.lookup("a", [0, 1, 2, 9, 4, 5, 6, 7, 8]) is None
    assert cache.lookup("b", first) is None              # another adapter: its own prefixes only
    s = cache.stats
    assert (s.lookups, s.hits, s.hit_tokens, s.stored) == (4, 2, 12, 1)


def test_entries_are_evicted_least_recently_used_within_the_budget():
    block_bytes = 4 * 4 * 2                              # one block of 4 float32 keys and 4 values
    cache = PrefixCache(max_bytes=3 * block_bytes, block=4)
    a, b, c = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]
    for prompt in (a, b):
        cache.store("x", prompt, fake_read(prompt))
    cache.store("x", a, pytest.fail)                     # cached already: not read again
    assert cache.lookup("x", a) is not None              # a used: b is now the least recent
    cache.store("x", c + c, fake_read(c + c))            # two blocks: evicts b only
    assert cache.lookup("x", b) is None and cache.lookup("x", a) is not None
    assert cache.lookup("x", c + c + [0])[1] == 8 and cache.stats.evictions == 1
    assert cache.stats.bytes == 3 * block_bytes
    big = list(range(100, 117))
    cache.store("x", big, fake_read(big))                 # larger than the whole budget: not kept, nothing evicted
    assert cache.lookup("x", big) is None and cache.stats.stored == 3 and cache.stats.evictions == 1
    shared = a[:4] + [50, 51, 52, 53, 54]                 # shares a's block; the newer entry holds it too
    cache.store("x", shared, fake_read(shared))           # evicts c, then a (least recent first)
    assert cache.lookup("x", a)[1] == 4                   # a's block is still found, in the newer entry


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # the dense LoRA covers half the modules
@pytest.mark.parametrize("task", [ROUTED[1], DENSE])
def test_reused_prefixes_give_pefts_tokens(task, make_engine, tiny_llama_path, tmp_path):
    engine = make_engine(prefix_cache_mb=8)
    plain = make_engine()
    first = [SHARED + [60 + i, 70 + i, 80] for i in range(3)]
    second = [SHARED + [90 + i] for i in range(3)] + [[7, 8, 9, 10]]   # three hits, one too short for a block
    engine.generate([Request(p, task, GREEDY) for p in first])
    results = engine.generate([Request(p, task, GREEDY) for p in second])   # one prefill: starts 32, 32, 32, 0
    stats = engine.stats().prefix
    assert stats.hits >= 3 and stats.hit_tokens >= 3 * 32
    lora = engine.tasks.bundle.task_lora(task)
    for i, (p, result) in enumerate(zip(second, results, strict=True)):
        assert result.tokens == plain.generate([Request(p, task, GREEDY)])[0].tokens
        if i in (0, 3):
            assert result.tokens == peft_greedy(tiny_llama_path, lora, tmp_path / str(i), p, GREEDY.max_new_tokens)
    assert engine.kv.n_active == 0


def test_prefixes_are_never_shared_across_adapters_or_task_versions(make_engine):
    engine = make_engine(prefix_cache_mb=8)
    prompt = SHARED + [61]
    engine.generate([Request(prompt, ROUTED[0], GREEDY)])
    hits = engine.stats().prefix.hits
    engine.generate([Request(prompt, ROUTED[1], GREEDY), Request(prompt, None, GREEDY)])
    assert engine.stats().prefix.hits == hits            # another task, the bare backbone: no hit
    engine.put_task(ROUTED[0], logits=random_logits(engine.tasks.bundle, 5))
    (replaced,) = engine.generate([Request(prompt, ROUTED[0], GREEDY)])
    assert engine.stats().prefix.hits == hits            # a new version of the task: its own prefixes
    (again,) = engine.generate([Request(prompt, ROUTED[0], GREEDY)])
    assert engine.stats().prefix.hits == hits + 1 and again.tokens == replaced.tokens


def test_the_transformers_forward_reuses_prefixes_too(make_engine):
    """Architectures outside the lean forward's family go through transformers' forward, with the same cache."""
    engine, plain = make_engine(prefix_cache_mb=8), make_engine()
    engine.lean = plain.lean = None
    engine.generate([Request(SHARED + [60], ROUTED[0], GREEDY)])
    prompts = [SHARED + [90 + i] for i in range(2)] + [[7, 8, 9, 10]]
    got = engine.generate([Request(p, ROUTED[0], GREEDY) for p in prompts])
    assert engine.stats().prefix.hits == 2
    assert [r.tokens for r in got] == [r.tokens for r in plain.generate([Request(p, ROUTED[0], GREEDY)
                                                                         for p in prompts])]


def test_prefix_reuse_is_counted_in_the_metrics(make_engine):
    with serve_app(create_app(make_engine(prefix_cache_mb=8))) as url:
        for suffix in (61, 62):
            r = http.post(f"{url}/v1/completions", json={"model": ROUTED[0], "prompt": SHARED + [suffix],
                                                          "max_tokens": 2})
            assert r.status_code == 200, r.text
        text = http.get(f"{url}/metrics").text
    assert "mhr_prefix_cache_hit_tokens_total 32.0" in text and "mhr_prefix_cache_hits_total 1.0" in text
    assert "mhr_prefix_cache_lookups_total 2.0" in text and "mhr_prefix_cache_bytes " in text


def test_prompts_prefilled_in_chunks_store_and_reuse_prefixes(make_engine):
    engine, plain = make_engine(prefix_cache_mb=8, max_prefill_tokens=12), make_engine(max_prefill_tokens=12)
    prompts = [SHARED + [61, 62], SHARED + [71], SHARED[:20] + [81, 82, 83]]  # staged, then from the cache
    got = [engine.generate([Request(p, ROUTED[2], GREEDY)])[0].tokens for p in prompts]
    assert engine.stats().prefix.hit_tokens == 32 + 16   # the second after 32 tokens, the third after 16
    assert got == [plain.generate([Request(p, ROUTED[2], GREEDY)])[0].tokens for p in prompts]
