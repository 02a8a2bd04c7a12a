"""The lean Llama forward against transformers' forward on the same wrapped model, and when it is chosen;
a bfloat16 model attending in a float32 KV cache; the compiled op's bfloat16 logits against torch ops'."""

import pytest
import torch
from transformers import (
    AttentionInterface,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine.kv_cache import kv_dtype
from server.engine.requests import Request
from server.model.decoder import LeanDecoder, Part, lean_decoder_for
from server.model.lora_ops import SlotPlan
from tests.server.conftest import DENSE, ROUTED
from tests.server.engine.test_core import GREEDY, mixed_requests

PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63], [1, 70], [1, 80, 81, 82, 83, 84]]


def step_logits(engine, slots: list[int]) -> list[torch.Tensor]:
    """Prefill PROMPTS (right-padded, one forward) then two decode steps of given tokens (the same whatever
    the logits); the logits of real positions."""
    kv, lengths = engine.kv, [len(p) for p in PROMPTS]
    width = max(lengths)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in PROMPTS])
    plan = SlotPlan.of(slots, "cpu")
    assert plan.uniform is None  # rows of different slots: the mixed-batch paths (gathered, compiled op)
    prefill = Part(ids, kv.begin_prefill(kv.add_rows(len(PROMPTS)), lengths), plan, torch.arange(width))
    [logits] = engine._forward([prefill])                                             # [n, width, V]
    out = [logits[i, :n] for i, n in enumerate(lengths)]
    for token in (90, 91):
        decode = Part(torch.full((len(PROMPTS), 1), token), kv.begin_decode(), plan, 1)
        [step] = engine._forward([decode])                                            # [n, 1, V]
        kv.end_decode(decode.attention)
        out.append(step[:, 0])
    for row in reversed(range(len(PROMPTS))):
        kv.remove_row(row)
    return out


def slots_of(engine, tasks: list[str]) -> list[int]:
    """The slots `tasks`' adapters are loaded into (held for the rest of the test)."""
    keys = [engine.tasks.resolve(t) for t in tasks]
    slots = [engine.cache.acquire(key, lambda key=key: engine.tasks.load(key)) for key in keys]
    engine.cache.write_pending()
    return slots


def test_lean_logits_equal_transformers_forward_on_a_mixed_batch(make_engine):
    engine = make_engine()
    assert isinstance(engine.lean, LeanDecoder)
    s1, s2, s3 = slots_of(engine, [ROUTED[0], ROUTED[3], DENSE])
    slots = [s1, s2, 0, s3, s1]  # rows of different tasks, one bare row, prompts of 2..7 tokens
    lean = step_logits(engine, slots)
    engine.lean = None
    reference = step_logits(engine, slots)
    for got, want in zip(lean, reference, strict=True):
        assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_lean_and_transformers_forward_generate_the_same_tokens(make_engine, tiny_tokenizer):
    requests = mixed_requests(tiny_tokenizer)
    lean = make_engine().generate(requests)
    engine = make_engine()
    engine.lean = None
    reference = engine.generate([Request(r.prompt, r.task, GREEDY) for r in requests])
    assert [r.tokens for r in lean] == [r.tokens for r in reference]


def packed_step(engine, slots: list[int], together: bool) -> list[torch.Tensor]:
    """Three prompts prefilled, then one step of three parts: their next tokens, two new prompts of other
    lengths and slots, and the first chunk of a long prompt in the staging row; that step's logits per part,
    from one forward (`together`) or one forward a part."""
    kv = engine.kv
    running = Part(torch.tensor([[1, 40, 41, 42], [1, 50, 0, 0], [1, 60, 61, 0]]),
                   kv.begin_prefill(kv.add_rows(3), [4, 2, 3]), SlotPlan.of(slots[:3], "cpu"), torch.arange(4))
    engine._forward([running])
    decode = Part(torch.tensor([[90], [91], [92]]), kv.begin_decode(), SlotPlan.of(slots[:3], "cpu"), 1)
    new = Part(torch.tensor([[1, 70, 71, 72, 73, 74], [1, 80, 81, 0, 0, 0]]),
               kv.begin_prefill(kv.add_rows(2), [6, 3]), SlotPlan.of(slots[3:5], "cpu"), torch.tensor([2, 5]))
    chunk = Part(torch.tensor([[1, 5, 6, 7]]), kv.begin_chunk(0, 4), SlotPlan.of(slots[5:], "cpu"), 4)
    parts = [decode, new, chunk]
    return engine._forward(parts) if together else [engine._forward([part])[0] for part in parts]


@pytest.mark.parametrize(("dtype", "cpu_kernel"), [(torch.float32, True), (torch.bfloat16, True),
                                                     (torch.float32, False)])
def test_one_forward_of_a_steps_parts_equals_a_forward_per_part(make_engine, dtype, cpu_kernel):
    """The lean forward packs a step's parts into one input for the linears: each part's logits equal its own
    forward's, bit for bit with the compiled op (every output element sums in the same order whatever the
    other rows are), within float rounding with torch's matmuls (per-part gathers)."""
    logits = []
    for together in (True, False):
        engine = make_engine(dtype=dtype, cpu_kernel=cpu_kernel)
        s1, s2, s3 = slots_of(engine, [ROUTED[0], ROUTED[3], DENSE])
        logits.append(packed_step(engine, [s1, 0, s2, s3, s1, s2], together))
    for got, want in zip(*logits, strict=True):
        if cpu_kernel:
            assert torch.equal(got, want)
        else:
            assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_lean_forward_is_chosen_only_for_exact_llama_architectures(tiny_llama):
    assert isinstance(lean_decoder_for(tiny_llama, 96), LeanDecoder)

    class Custom(LlamaForCausalLM):  # a subclass may change the forward: not trusted
        pass

    assert lean_decoder_for(Custom(tiny_llama.config), 96) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    assert lean_decoder_for(gpt2, 32) is None
    mistral = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=64)
    assert isinstance(lean_decoder_for(MistralForCausalLM(MistralConfig(**mistral, sliding_window=None)), 96),
                      LeanDecoder)
    windowed = MistralForCausalLM(MistralConfig(**mistral, sliding_window=16))
    assert lean_decoder_for(windowed, 96) is None  # a window shorter than the sequences: not the same attention


@pytest.mark.parametrize(("family", "n_kv_heads"), [("mistral", 1), ("mistral", 2), ("qwen3", 1), ("qwen3", 2)])
def test_lean_forward_equals_the_models_own_forward(family, n_kv_heads):
    """A bare Mistral or Qwen3 (GQA when n_kv_heads < heads; Qwen3's per-head query and key norms, given
    weights other than ones) through the lean path equals its own forward."""
    from server.engine.kv_cache import RowKVCache
    from server.model.layers import wrap_model

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=n_kv_heads, head_dim=32, vocab_size=64, sliding_window=None)
    model = (MistralForCausalLM(MistralConfig(**shape)) if family == "mistral"
             else Qwen3ForCausalLM(Qwen3Config(**shape))).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                weight.uniform_(0.5, 1.5)
    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    context, _ = wrap_model(model, ["model.layers.0.self_attn.q_proj"], n_slots=2, max_rank=2)
    context.plan = SlotPlan.of([0, 0], "cpu")
    kv = RowKVCache(2, 2, n_kv_heads, 16, 32, "cpu", torch.float32)
    part = Part(ids, kv.begin_prefill(kv.add_rows(2), [6, 6]), context.plan, torch.arange(6))
    with torch.no_grad():
        [got] = lean_decoder_for(model, 16)([part], kv)
    assert torch.allclose(got, want, atol=1e-5)


def test_bfloat16_compiled_op_logits_match_torch_ops_on_a_mixed_batch(make_engine):
    """Within bfloat16's rounding (the two paths sum and round differently); a row on another task's slot
    moves its logits by ~25x the tolerance."""
    logits = []
    for cpu_kernel in (True, False):
        engine = make_engine(dtype=torch.bfloat16, cpu_kernel=cpu_kernel)
        s1, s2 = slots_of(engine, [ROUTED[0], DENSE])
        logits.append(step_logits(engine, [s1, s2, 0, s2, s1]))
    for got, want in zip(*logits, strict=True):
        assert torch.allclose(got.float(), want.float(), atol=0.05 * want.abs().max().item(), rtol=0)


def float32_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention computed in float32 and returned in the query's dtype."""
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                          **kwargs)
    return out.to(query.dtype), weights


def test_bfloat16_model_with_a_float32_kv_cache_equals_transformers_with_float32_attention(make_engine):
    """The lean forward of a bfloat16 model attends in its cache's dtype: as transformers' own forward
    does with an attention function that computes in float32 (the same model, projections in bfloat16)."""
    engine = make_engine(dtype=torch.bfloat16, kv_dtype="float32")
    assert engine.kv.keys[0].dtype == torch.float32 and engine.model.dtype == torch.bfloat16
    s1, s2 = slots_of(engine, [ROUTED[0], DENSE])
    slots = [s1, s2, 0, s2, s1]
    lean = step_logits(engine, slots)
    AttentionInterface.register("float32_sdpa", float32_sdpa)
    engine.model.set_attn_implementation("float32_sdpa")
    engine.lean = None
    reference = step_logits(engine, slots)
    for got, want in zip(lean, reference, strict=True):
        assert torch.equal(got, want)


def test_kv_dtype_auto_keeps_the_model_dtype_except_lean_half_precision_on_a_cpu_without_it():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kv_dtype("auto", cpu, torch.float32, lean=True) == torch.float32
    assert kv_dtype("auto", cuda, torch.bfloat16, lean=True) == torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported()
    assert kv_dtype("auto", cpu, torch.bfloat16, lean=True) == (torch.bfloat16 if native else torch.float32)
    assert kv_dtype("auto", cpu, torch.bfloat16, lean=False) == torch.bfloat16  # transformers attends in bf16
    assert kv_dtype("bfloat16", cpu, torch.bfloat16, lean=True) == torch.bfloat16
    assert kv_dtype("float32", cuda, torch.float16, lean=False) == torch.float32
