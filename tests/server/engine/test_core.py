"""The engine end to end on the tiny model: batch invariance, equality with PEFT, streaming, sampling.

Cache pressure, cancellation, the bounded queue, zero-shot policy and live task changes are in
test_engine_control.py.
"""

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import mhr
from server.config import ServerConfig
from server.engine.core import Engine
from server.engine.requests import Request, SamplingParams
from server.model.layers import PanelLinear
from tests.server.conftest import DENSE, ROUTED

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
WORDS = "The quiet river copies the stone while the small red bird sees the old house".split()


def prompt(tokenizer, n_words: int, offset: int = 0) -> list[int]:
    return tokenizer(" ".join(WORDS[offset:offset + n_words]))["input_ids"]


def mixed_requests(tokenizer, params=GREEDY) -> list[Request]:
    """Ten requests: every routed task, the dense task, the bare backbone and an unknown task (zero-shot)."""
    tasks = [*ROUTED, DENSE, None, "not-in-bundle", ROUTED[0]]
    return [Request(prompt(tokenizer, 2 + (3 * i) % 11, i % 4), task, params) for i, task in enumerate(tasks)]


def run_alone(engine, requests):
    return [engine.generate([Request(r.prompt, r.task, r.params)])[0] for r in requests]


def run_staggered(engine, requests, per_step=3):
    """Submit a few requests, step, submit more: later requests join a batch already decoding."""
    handles = []
    for i in range(0, len(requests), per_step):
        handles += [engine.submit(r) for r in requests[i:i + per_step]]
        engine.step()
        engine.step()
    while not all(h.done for h in handles):
        engine.step()
    return [h.result() for h in handles]


def test_outputs_do_not_depend_on_the_batch(make_engine, tiny_tokenizer):
    requests = mixed_requests(tiny_tokenizer)
    alone = run_alone(make_engine(), requests)
    engine = make_engine()
    together = engine.generate(requests)
    staggered = run_staggered(make_engine(), requests)
    chunked = run_staggered(make_engine(max_prefill_tokens=4), requests)  # prompts over 4 tokens in chunks
    for a, b, c, d in zip(alone, together, staggered, chunked, strict=True):
        assert a.tokens == b.tokens == c.tokens == d.tokens and len(a.tokens) == GREEDY.max_new_tokens
        assert a.adapter == b.adapter == c.adapter == d.adapter
    assert [r.adapter for r in together[-4:]] == [DENSE, "base", "zero-shot", ROUTED[0]]
    assert len({tuple(r.tokens) for r in together}) >= 8, "adapters should change the outputs"
    assert engine.kv.n_active == 0 and len(engine.batch) == 0


def peft_greedy(model_path, lora, tmp_path, prompt_ids, max_new_tokens):
    peft_dir = mhr.export_peft(lora, tmp_path / "peft", base_model_name_or_path=str(model_path))
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, peft_dir).eval()
    out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # the dense LoRA covers half the modules
@pytest.mark.parametrize("task", [ROUTED[1], DENSE, "unknown-task"])
@pytest.mark.parametrize("max_prefill_tokens", [2048, 3])  # 3: every prompt prefilled in chunks
def test_tokens_equal_peft(task, max_prefill_tokens, make_engine, tiny_llama_path, tiny_tokenizer, tmp_path):
    engine = make_engine(max_prefill_tokens=max_prefill_tokens)
    bundle = engine.tasks.bundle
    lora = bundle.zero_shot_lora() if task == "unknown-task" else bundle.task_lora(task)
    prompts = [prompt(tiny_tokenizer, 5), prompt(tiny_tokenizer, 9, 3)]
    params = SamplingParams(max_new_tokens=12)  # EOS ends both the same way
    results = engine.generate([Request(p, task, params) for p in prompts])
    for p, result in zip(prompts, results, strict=True):
        want = peft_greedy(tiny_llama_path, lora, tmp_path / str(len(p)), p, params.max_new_tokens)
        assert result.tokens == want


def test_seeded_sampling_does_not_depend_on_the_batch(make_engine, tiny_tokenizer):
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
    requests = mixed_requests(tiny_tokenizer, params)
    alone = run_alone(make_engine(), requests[:3])
    together = make_engine().generate(requests)
    assert [r.tokens for r in alone] == [r.tokens for r in together[:3]]


def test_stop_string_ends_the_request(make_engine, tiny_tokenizer):
    engine = make_engine()
    p = prompt(tiny_tokenizer, 4)
    full = engine.generate([Request(p, ROUTED[2], GREEDY)])[0]
    stop = full.text[3:6]
    assert len(stop) == 3
    cut = engine.generate([Request(p, ROUTED[2], SamplingParams(max_new_tokens=10, stop=(stop,)))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]


def test_async_stream_delivers_every_token(make_engine, tiny_tokenizer):
    engine = make_engine()
    requests = mixed_requests(tiny_tokenizer)[:4]
    want = engine.generate([Request(r.prompt, r.task, r.params) for r in requests])

    async def consume(request):
        handle = engine.submit(request)
        tokens = [event.token async for event in handle]
        return tokens, await handle.wait()

    async def main():
        loop = asyncio.create_task(engine.serve())
        try:
            return await asyncio.gather(*(consume(r) for r in requests))
        finally:
            loop.cancel()

    for (streamed, result), expected in zip(asyncio.run(main()), want, strict=True):
        assert streamed == result.tokens == expected.tokens


def test_bfloat16_engine_serves_mixed_tasks_on_the_compiled_op(make_engine, tiny_tokenizer):
    """Its logits against torch ops' are in model/test_decoder.py (two bfloat16 paths round differently, so greedy
    tokens may part at a near tie)."""
    engine, plain = make_engine(dtype=torch.bfloat16), make_engine(dtype=torch.bfloat16, cpu_kernel=False)
    requests = mixed_requests(tiny_tokenizer)[:5]
    results = engine.generate(requests)
    assert all(len(r.tokens) == GREEDY.max_new_tokens for r in results)
    assert engine.slots.layers[next(iter(engine.slots.layers))].lora_A.dtype == torch.bfloat16
    assert isinstance(engine.model.lm_head, PanelLinear) and engine.model.lm_head.panels.dtype == torch.bfloat16
    assert plain.model.lm_head.weight.is_contiguous()  # without the op, half precision keeps the default layout


def test_float32_engine_on_cpu_packs_its_linears_for_the_kernel_else_stores_them_transposed(make_engine):
    packed = make_engine().model
    assert [m for m in packed.modules() if isinstance(m, PanelLinear)]
    shared = {id(packed.get_input_embeddings().weight)}  # a tied lm_head keeps the embedding's layout
    assert all(id(m.weight) in shared for m in packed.modules() if isinstance(m, torch.nn.Linear))
    linears = [m for m in make_engine(cpu_kernel=False).model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() for m in linears)


def test_compiled_cpu_kernels_serve_mixed_batches_like_torch_ops(make_engine, tiny_tokenizer):
    with_kernel = make_engine()
    assert all(isinstance(layer.base, PanelLinear) for layer in with_kernel.slots.layers.values()), \
        "the CPU kernels did not build (needs g++)"
    without = make_engine(cpu_kernel=False)
    assert all(type(layer.base) is torch.nn.Linear for layer in without.slots.layers.values())
    requests = mixed_requests(tiny_tokenizer)
    for a, b in zip(with_kernel.generate(requests), without.generate(requests), strict=True):
        assert a.tokens == b.tokens and a.adapter == b.adapter


def test_engine_from_config_paths(tiny_llama_path, bundle_path, tiny_tokenizer):
    engine = Engine.from_config(ServerConfig(model=str(tiny_llama_path), bundle=str(bundle_path), n_slots=4))
    result = engine.generate([Request(prompt(tiny_tokenizer, 3), ROUTED[0], GREEDY)])[0]
    assert result.adapter == ROUTED[0] and len(result.tokens) == GREEDY.max_new_tokens and result.text
