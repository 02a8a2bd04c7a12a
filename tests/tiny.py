"""Tiny seeded causal LMs (a Llama by default) plus tokenizer, built locally so tests never touch the network.

Owns: the procedural tokenizer corpus, tokenizer training, the model config and seeded weights,
and writing both into one directory that `AutoModelForCausalLM` / `AutoTokenizer` load offline.
Leaves fixtures (scoping, loading per test) to `tests/conftest.py`.

The tokenizer does not depend on the seed; the seed only picks the model weights.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

# Bump when the recipe below changes, so a stale directory is never mistaken for a fresh build.
RECIPE_VERSION = 1
MARKER = "tiny_build.json"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3 in this order
VOCAB_SIZE = 384  # 4 specials + 256 byte symbols + ~124 merges

# Enough for the OpenAI-style chat endpoint to render messages; not a real chat format.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

MODEL_SHAPE = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,  # >= 32 so vLLM (CPU) accepts the model as well
    num_hidden_layers=2,
    intermediate_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

_SYLLABLES = ["ka", "lo", "mi", "ra", "tu", "ne", "so", "vi", "da", "pe", "zu", "fo", "gi", "ba", "xe"]
_NOUNS = ["cat", "dog", "bird", "tree", "river", "stone", "house", "book", "lamp", "road"]
_VERBS = ["sees", "likes", "moves", "finds", "counts", "copies", "sorts", "keeps"]
_ADJS = ["red", "small", "quiet", "old", "bright", "green", "fast", "heavy"]


def tiny_corpus(n_lines: int = 400) -> list[str]:
    """Deterministic text: made-up words, simple sentences, digits and task-like prompts."""
    rng = random.Random(1234)

    def word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))

    lines = []
    for i in range(n_lines):
        kind = i % 4
        if kind == 0:
            lines.append(" ".join(word() for _ in range(rng.randint(3, 9))))
        elif kind == 1:
            a, b = rng.sample(_NOUNS, 2)
            lines.append(f"The {rng.choice(_ADJS)} {a} {rng.choice(_VERBS)} the {b}.")
        elif kind == 2:
            xs = [rng.randint(0, 99) for _ in range(rng.randint(2, 6))]
            lines.append(f"sum of {' '.join(map(str, xs))} is {sum(xs)}")
        else:
            w = word()
            lines.append(f"Input: {w} Output: {w[::-1].upper()}")
    return lines


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (so any text round-trips) trained on `tiny_corpus`, BOS prepended."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Llama-style: BOS in front of every sequence, no EOS (generation appends that itself).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The test backbone's config; vocab and special ids come from `tokenizer`."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )


def build_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny seeded Llama (float32, safetensors) and its tokenizer into `out_dir` (`build_tiny_model`)."""
    return build_tiny_model(out_dir, tiny_llama_config, "llama", seed)


def build_tiny_model(out_dir: Path, config_for: Callable[[PreTrainedTokenizerFast], PretrainedConfig],
                     name: str, seed: int = 0) -> Path:
    """Write a tiny seeded causal LM (float32, safetensors) of config `config_for(tokenizer)` and the
    tokenizer into `out_dir`; `name` tells apart the configs built by one recipe.

    Idempotent: a directory already built by this recipe with the same name and seed is reused as is.
    A directory built with another name, seed or recipe raises ValueError rather than being replaced.
    The build happens in a sibling temp directory and is renamed into place, so a crash never
    leaves a half-written model behind. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    want = {"recipe_version": RECIPE_VERSION, "model": name, "seed": seed}
    marker = out_dir / MARKER
    if marker.exists():
        have = json.loads(marker.read_text())
        if have != want:
            raise ValueError(f"{out_dir} holds a tiny model built as {have}, not {want}")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and holds no {MARKER}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer = train_tokenizer()
        config = config_for(tokenizer)
        # A local generator would be nicer, but transformers initialises from the global RNG;
        # fork it so building a model does not disturb the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
        model.save_pretrained(tmp)  # safetensors is the only format in transformers 5
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(want))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; other processes (a server) may read it
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
