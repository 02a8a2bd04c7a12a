"""Which zero-shot candidate serves unknown names (the one `mhr zeroshot` selected on validation data, as the
bundle records it), named in the X-MHR-Zero-Shot header and the mhr_zero_shot_adapter metric."""

from __future__ import annotations

import pytest

import mhr
from server.http.app import ADAPTER_HEADER, ZERO_SHOT_HEADER
from tests.server import loopback as http
from tests.server.admin_helpers import admin_app, copy_bundle, engine_on
from tests.server.conftest import ROUTED, random_lora
from tests.server.loopback import serve_app


@pytest.mark.parametrize(("recorded", "stored", "source"), [
    ("backbone", True, "backbone"), ("average", False, "average"), ("trained", True, "trained"),
    (None, True, "trained"), (None, False, "average"),  # bundles from before the selection was recorded
])
def test_the_zero_shot_candidate_is_named_in_a_header_and_the_metrics(tiny_llama_path, tiny_tokenizer, bundle_path,
                                                                      tmp_path, recorded, stored, source):
    bundle = mhr.Bundle.load(copy_bundle(bundle_path, tmp_path / "bundle"))
    bundle.set_zero_shot(random_lora(bundle, rank=4, seed=3) if stored else None)
    if recorded is not None:
        bundle.training["zero_shot"] = {"selected": recorded, "candidates": {}}
    bundle.save(tmp_path / "bundle")
    engine = engine_on(tiny_llama_path, tiny_tokenizer, tmp_path / "bundle")
    with serve_app(admin_app(engine, tmp_path / "bundle")) as base:
        body = {"model": "an-unknown-task", "prompt": "The quiet river", "max_tokens": 2}
        r = http.post(f"{base}/v1/completions", json=body)
        assert r.headers[ADAPTER_HEADER] == "zero-shot" and r.headers[ZERO_SHOT_HEADER] == source
        with http.stream("POST", f"{base}/v1/completions", json=body | {"stream": True}) as s:
            assert s.headers[ZERO_SHOT_HEADER] == source
        known = http.post(f"{base}/v1/completions", json=body | {"model": ROUTED[0]})
        assert ZERO_SHOT_HEADER not in known.headers
        assert f'mhr_zero_shot_adapter{{source="{source}"}} 1.0' in http.get(f"{base}/metrics").text
