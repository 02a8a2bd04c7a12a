"""Benchmark the torch engine on each model family: its lean decoder against transformers' forward (the fallback).

    python -m bench.bench_families [--hidden 256] [--layers 4] [--repeats 3] [--threads 2]

Each family of `tests/families/models.py` at a small size (hidden 256, 4 layers, 8 heads of 32 by default),
seeded random weights and a random bundle; 8 prompts of 32 tokens, each of a different task, 32 greedy
tokens each with EOS ignored. Families the lean decoder serves run both ways on one engine, interleaved
(`bench.bench_engine.median_seconds`), and get the ratio; the others run the fallback only. Mistral's test
config slides a window of 8 (fallback); "mistral, window >= context" is the same model with a window the
context never reaches, which the lean decoder serves. Never asserts: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

import mhr
from bench.bench_engine import median_seconds
from server.config import ServerConfig
from server.engine.core import Engine
from server.engine.requests import Request, SamplingParams
from server.model.decoder import LeanDecoder
from tests.families.models import FAMILIES, Family

VOCAB, PROMPTS, PROMPT_LEN, NEW_TOKENS = 2048, 8, 32, 32


def families() -> list[Family]:
    """The test families, plus Mistral with a window beyond the context."""
    mistral = next(f for f in FAMILIES if f.name == "mistral")
    wide = dataclasses.replace(mistral, name="mistral, window >= context",
                               settings=mistral.settings | dict(sliding_window=4096))
    return [*FAMILIES, wide]


def engine_for(family: Family, hidden: int, layers: int) -> Engine:
    """The family at `hidden` x `layers` with random weights, serving a random bundle of PROMPTS routed tasks."""
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 32,
                 intermediate_size=hidden * 11 // 4, max_position_embeddings=512)
    if "layer_types" in family.settings:  # the tiny config's pattern of layer kinds, over all the layers
        pattern = family.settings["layer_types"]
        sizes["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    config = family.config(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    trained = copy.deepcopy(model)
    mhr_config = mhr.MHRConfig(n_skills=8, n_heads=2, rank=8, alpha=16.0, target_modules=list(family.targets))
    with torch.no_grad():
        for layer in mhr.inject(trained, mhr_config, PROMPTS).values():
            layer.lora_B.normal_(std=0.02)
            layer.router.logits.normal_(std=2.0)
    bundle = mhr.Bundle.from_model(trained, mhr_config, family.name, [f"task{i}" for i in range(PROMPTS)])
    server = ServerConfig(n_slots=PROMPTS + 2, max_running=PROMPTS, max_seq_len=PROMPT_LEN + NEW_TOKENS)
    return Engine(model, bundle, server)


def run(engine: Engine, lean: LeanDecoder | None) -> Callable[[], None]:
    """One mixed batch, every prompt of another task, through `lean` (None: the transformers forward)."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, VOCAB, (PROMPTS, PROMPT_LEN), generator=g).tolist()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def go() -> None:
        engine.lean = lean
        engine.generate([Request(p, f"task{i}", params) for i, p in enumerate(prompts)])
    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = PROMPTS * NEW_TOKENS
    print(f"hidden {args.hidden}, {args.layers} layers, {PROMPTS} prompts of {PROMPT_LEN} tokens (one task each), "
          f"{NEW_TOKENS} new tokens each, {args.threads} threads; tokens/s, medians of {args.repeats}\n")
    print("| family | path | fallback tok/s | lean tok/s | lean / fallback |\n| --- | --- | ---: | ---: | ---: |")
    for family in families():
        engine = engine_for(family, args.hidden, args.layers)
        runs = {"fallback": run(engine, None)}
        if engine.lean is not None:
            runs["lean"] = run(engine, engine.lean)
        wall, _ = median_seconds(runs, args.repeats)
        fallback = tokens / wall["fallback"]
        if "lean" in wall:
            lean = tokens / wall["lean"]
            print(f"| {family.name} | lean | {fallback:.0f} | {lean:.0f} | {lean / fallback:.2f}x |")
        else:
            print(f"| {family.name} | fallback | {fallback:.0f} | | |")


if __name__ == "__main__":
    main()
