"""The model families users bring, as tiny seeded configs built locally (nothing is downloaded).

Owns each family's config (the architecture's distinguishing features switched on: rope scaling, sliding
windows short enough to matter in a test, soft-capping, fused projections, Conv1D), the linear layers an
adapter targets in it, and building its model directory (with `tests.tiny`'s tokenizer and recipe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    SmolLM3Config,
)

from tests.tiny import build_tiny_model

WINDOW = 8  # sliding windows shorter than the tests' prompts plus their generated tokens
# A wider init than transformers' default 0.02 keeps a random model's greedy tokens varied (with tied embeddings
# they would repeat one token), so that equal outputs say something.
SHAPE = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128,
             max_position_embeddings=256, initializer_range=0.2)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GQA = dict(head_dim=32, num_key_value_heads=1)
SLIDING_GEMMA = dict(GQA, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                     query_pre_attn_scalar=32, initializer_range=0.02)  # Gemma scales its embeddings already


@dataclass(frozen=True)
class Family:
    """A model family: its config class, what its tiny config sets beyond `SHAPE`, and the adapted linears."""

    name: str
    config_class: type[PretrainedConfig]
    settings: dict = field(default_factory=dict)
    targets: tuple[str, ...] = LLAMA_TARGETS

    def config(self, **overrides) -> PretrainedConfig:
        """The family's config: `SHAPE`, then its settings, then `overrides` (vocab, special ids, sizes)."""
        return self.config_class(**SHAPE | self.settings | overrides)


FAMILIES = (
    Family("llama3", LlamaConfig, dict(GQA, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    Family("mistral", MistralConfig, dict(GQA, sliding_window=WINDOW)),
    Family("qwen2.5", Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=True)),  # q/k/v biases
    Family("qwen3", Qwen3Config, dict(GQA, tie_word_embeddings=True)),
    Family("gemma2", Gemma2Config, dict(SLIDING_GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    Family("gemma3", Gemma3TextConfig, SLIDING_GEMMA),
    Family("phi3", Phi3Config, dict(num_key_value_heads=1), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    Family("gpt-neox", GPTNeoXConfig, dict(rotary_pct=0.25),  # Pythia: partial rotary, parallel residual
           ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    Family("gpt2", GPT2Config, targets=("c_attn", "c_proj", "c_fc")),  # Conv1D layers; MLP 4 x hidden
    Family("olmo2", Olmo2Config, dict(num_key_value_heads=1)),
    Family("smollm3", SmolLM3Config, dict(num_key_value_heads=1, no_rope_layer_interval=2)),  # rotary-free layers
)
# The families the engine runs with its lean decoder (`server.model.decoder`); the others by their own forward.
LEAN = {"llama3", "qwen2.5", "qwen3"}


def build_family(family: Family, out_dir: Path, seed: int = 0) -> Path:
    """Write the family's tiny seeded model and the tiny tokenizer into `out_dir` (`tests.tiny.build_tiny_model`)."""

    def config_for(tokenizer) -> PretrainedConfig:
        return family.config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return build_tiny_model(out_dir, config_for, family.name, seed)
