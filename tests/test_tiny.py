"""The tiny-model helper itself: loads offline, has the promised shape, is deterministic."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.tiny import build_tiny_llama


def test_loads_offline_with_auto_class(tiny_llama_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert (tiny_llama_path / "model.safetensors").is_file()


def test_shape(tiny_llama, tiny_tokenizer):
    cfg = tiny_llama.config
    assert cfg.head_dim == 32
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 2)
    assert cfg.vocab_size == len(tiny_tokenizer)
    assert not cfg.tie_word_embeddings
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    assert q_proj.weight.shape == (64, 64)


def test_tokenizer_round_trip(tiny_tokenizer):
    text = "The quiet river copies the stone. Unseen: Zürich 42!"
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tiny_tokenizer.pad_token_id is not None
    assert tiny_tokenizer.eos_token_id is not None


def test_generate(tiny_llama, tiny_tokenizer):
    tiny_tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    batch = tiny_tokenizer(["sum of 1 2 is", "Input: kalo"], return_tensors="pt", padding=True)
    out = tiny_llama.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_build_is_seeded_and_idempotent(tmp_path, tiny_llama_path):
    again = build_tiny_llama(tmp_path / "same", seed=0)
    other = build_tiny_llama(tmp_path / "other", seed=1)
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llama(again, seed=0) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt

    ref = load_file(tiny_llama_path / "model.safetensors")
    same = load_file(again / "model.safetensors")
    diff = load_file(other / "model.safetensors")
    assert ref.keys() == same.keys() == diff.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not torch.equal(
        ref["model.layers.0.self_attn.q_proj.weight"], diff["model.layers.0.self_attn.q_proj.weight"]
    )
    assert (again / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_build_refuses_other_seed_in_same_dir(tiny_llama_path):
    with pytest.raises(ValueError, match="seed"):
        build_tiny_llama(tiny_llama_path, seed=1)
