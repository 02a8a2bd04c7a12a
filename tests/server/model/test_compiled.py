"""The compiled decode step against the eager one on the tiny model: the same greedy tokens for mixed batches of
every size, no recompilation within the buckets once compiled, the attended length rounded up to blocks (as on
CUDA), and eager serving when compiling fails. The engine's end-to-end tests run compiled in
engine/test_core_compiled.py."""

import logging

import pytest
import torch

from server.engine.requests import Request, SamplingParams
from server.model.compiled import CompiledDecode, row_buckets
from tests.server.conftest import ROUTED
from tests.server.engine.test_core import mixed_requests, prompt, run_staggered

MAX_RUNNING = 4  # buckets 1, 2, 4: few compilations on a small CPU


@pytest.fixture
def engines(make_engine):
    """(eager, compiled) engines (every bucket of the compiled one compiled as it starts)."""
    return make_engine(max_running=MAX_RUNNING), make_engine(compile=True, max_running=MAX_RUNNING)


@pytest.mark.parametrize(("max_rows", "buckets"), [(1, [1]), (4, [1, 2, 4]), (6, [1, 2, 4, 6]), (16, [1, 2, 4, 8, 16])])
def test_row_buckets(max_rows, buckets):
    assert row_buckets(max_rows) == buckets


def test_compiled_steps_give_eager_tokens_and_never_recompile(engines, tiny_tokenizer):
    eager, compiled = engines
    requests = mixed_requests(tiny_tokenizer)  # 10 requests of 7 adapters through 4 rows: batches of 1 to 4 rows
    want = [r.tokens for r in run_staggered(eager, requests)]
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompilation fails the step (-> eager)
        got = [r.tokens for r in run_staggered(compiled, requests)]
        alone = [r.tokens for r in compiled.generate(requests[:1])]
    assert got == want and alone == want[:1]
    assert not compiled.compiled.failed and sorted(compiled.compiled.compile_seconds) == [1, 2, 4]


@pytest.mark.parametrize("kv_block", [16, 200])  # 200: past the cache's 96 positions, which bound it
def test_attended_length_in_blocks_gives_the_same_tokens(engines, tiny_tokenizer, kv_block):
    """The CUDA path's padding of the attended positions (here on CPU: the same graph, another length)."""
    eager, compiled = engines
    compiled.compiled = CompiledDecode(compiled.lean, compiled.context, compiled.kv, MAX_RUNNING, kv_block)
    requests = mixed_requests(tiny_tokenizer)[:4]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [r.tokens for r in compiled.generate(requests)]
    assert got == [r.tokens for r in eager.generate(requests)] and not compiled.compiled.failed


def test_a_request_filling_the_cache_gives_eager_tokens(make_engine, tiny_tokenizer):
    """Its steps attend to every length up to the top of the graph's range (the cache's length - 1)."""
    settings = dict(max_running=1, max_seq_len=16)
    compiled = make_engine(compile=True, **settings)
    ids = prompt(tiny_tokenizer, 12)[:6]
    assert len(ids) == 6  # 6 + 10 tokens: the cache's 16 positions, the last decode step attending to 15
    request = Request(ids, ROUTED[1], SamplingParams(max_new_tokens=10, ignore_eos=True))
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled.generate([request])[0].tokens
    assert len(got) == 10 and got == make_engine(**settings).generate([request])[0].tokens
    assert not compiled.compiled.failed


def test_a_failed_compilation_serves_eagerly(make_engine, tiny_tokenizer, caplog, monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(CompiledDecode, "_run", broken)
    with caplog.at_level(logging.WARNING, logger="server.model.compiled"):
        engine = make_engine(compile=True, max_running=MAX_RUNNING)  # compiles as it starts
    assert engine.compiled.failed and "decode steps run eagerly" in caplog.text
    requests = mixed_requests(tiny_tokenizer)[:3]
    got = [r.tokens for r in engine.generate(requests)]
    assert got == [r.tokens for r in make_engine(max_running=MAX_RUNNING).generate(requests)]


def test_warm_up_refuses_a_serving_engine(make_engine, tiny_tokenizer):
    engine = make_engine(compile=True, max_running=MAX_RUNNING)
    engine.submit(mixed_requests(tiny_tokenizer)[0])
    engine.step()
    with pytest.raises(RuntimeError, match="before serving"):
        engine.compiled.warm_up()
