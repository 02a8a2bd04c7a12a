"""The compiled decode step against the eager one on the tiny model: the same greedy tokens for mixed batches of
every size, no recompilation within the buckets once compiled, the attended length rounded up to blocks (as on
CUDA), and eager serving when compiling fails. The engine's end-to-end tests run compiled in
engine/test_core_compiled.py."""

import logging

import pytest
import torch

from server.model.compiled import CompiledDecode, row_buckets
from tests.server.engine.test_core import mixed_requests, run_staggered

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


def test_attended_length_in_blocks_gives_the_same_tokens(engines, tiny_tokenizer):
    """The CUDA path's padding of the attended positions (here on CPU: the same graph, another length)."""
    eager, compiled = engines
    compiled.compiled = CompiledDecode(compiled.lean, compiled.context, compiled.kv, MAX_RUNNING, kv_block=16)
    requests = mixed_requests(tiny_tokenizer)[:4]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [r.tokens for r in compiled.generate(requests)]
    assert got == [r.tokens for r in eager.generate(requests)] and not compiled.compiled.failed


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
