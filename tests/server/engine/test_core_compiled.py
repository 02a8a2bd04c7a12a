"""test_core's batch-invariance, PEFT-equality and streaming tests with the engine's decode steps compiled
(`compile=True`; 4 running rows, so three row buckets to compile). Each test must run compiled steps and
none of its engines may have fallen back to eager steps."""

import pytest

from tests.server.engine.test_core import (  # noqa: F401 - collected here, with this module's make_engine
    test_async_stream_delivers_every_token,
    test_outputs_do_not_depend_on_the_batch,
    test_tokens_equal_peft,
)


@pytest.fixture
def make_engine(make_engine):
    """Compiled engines (test_core's `make_engine`, compile=True, 4 running rows unless told)."""
    made = []

    def make(**overrides):
        made.append(make_engine(**{"compile": True, "max_running": 4} | overrides))
        return made[-1]
    yield make
    assert not any(engine.compiled.failed for engine in made), "a compiled step failed and fell back to eager"
    assert any(engine.compiled.compile_seconds for engine in made), "no step ran compiled"
