"""The shared benchmark workload (docs/architecture.md, "Performance targets"), built locally with random weights.

A Llama-style backbone (33.7M parameters: hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8192),
16 prompts of 16-64 tokens, one task per prompt, LoRA rank 8 / alpha 16 on q,k,v,o,gate,up,down, 64
greedy tokens each with EOS ignored. Other backbone sizes: "small" for a quick run, "1b" for a GPU.
The tasks are routed MHR tasks of one bundle; their materialized LoRAs are what the PEFT baselines load,
so every system computes the same adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mhr

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REFERENCE_SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=8192)
SHAPES = {
    "reference": REFERENCE_SHAPE,
    "small": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000),
}


@dataclass
class Workload:
    model_dir: Path
    bundle_dir: Path
    prompts: list[list[int]]
    tasks: list[str]
    new_tokens: int


def build(out: Path, shape: str = "reference", n_prompts: int = 16, new_tokens: int = 64, seed: int = 0,
          device: str = "cpu", dtype: torch.dtype = torch.float32) -> Workload:
    """Write the backbone and a bundle of `n_prompts` routed tasks under `out`; returns the workload.

    `device` only speeds up the random initialisation of large backbones; `dtype` is the saved one.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    model_dir = out / "model"
    model.to(dtype).save_pretrained(model_dir)
    mhr_config = mhr.MHRConfig(n_skills=8, n_heads=4, rank=8, alpha=16.0, target_modules=TARGETS)
    tasks = [f"task{i:02d}" for i in range(n_prompts)]
    layers = mhr.inject(model, mhr_config, n_tasks=n_prompts)
    with torch.no_grad():  # trained-looking adapters: B nonzero, routing away from uniform
        for layer in layers.values():
            layer.lora_B.normal_(std=0.02)
            layer.router.logits.normal_(std=2.0)
    bundle = mhr.Bundle.from_model(model, mhr_config, backbone=str(model_dir), tasks=tasks)
    bundle.save(out / "bundle")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 65, (n_prompts,), generator=g).tolist()
    prompts = [[1] + torch.randint(3, config.vocab_size, (n - 1,), generator=g).tolist() for n in lengths]
    return Workload(model_dir, out / "bundle", prompts, tasks, new_tokens)


def load_backbone(workload: Workload, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(workload.model_dir, dtype=dtype).to(device).eval()
