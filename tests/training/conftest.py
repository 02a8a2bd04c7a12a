"""Fixtures of the training tests: a small copy of the task suite and a briefly pre-trained bundle."""

import shutil

import pytest
import torch

from training import suite
from training.config import TrainConfig
from training.data import read_jsonl
from training.pretrain import pretrain

TASKS = suite.TRAIN_TASKS[:4]
TARGETS = ["q_proj", "v_proj"]


def small_config(**overrides) -> TrainConfig:
    """Settings small enough for a few CPU seconds per run (on the CPU even where CUDA is available)."""
    base = dict(method="mhr", skills=3, heads=2, rank=2, alpha=2.0, target_modules=TARGETS, steps=3,
                batch_size=4, lr=1e-2, logits_lr=0.1, max_length=48, device="cpu")
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def suite_files(tmp_path_factory):
    return suite.write_suite(tmp_path_factory.mktemp("suite"), n_train=8, n_test=4, n_shots=4, seed=0)


@pytest.fixture(scope="session")
def train_examples(suite_files):
    return [ex for ex in read_jsonl(suite_files["train"]) if ex.task in TASKS]


@pytest.fixture(scope="session")
def pretrained(tiny_llama_path, train_examples, tmp_path_factory):
    """A bundle pre-trained for 3 steps on 4 suite tasks (read-only: copy it with `bundle_copy`)."""
    out = tmp_path_factory.mktemp("pretrained") / "bundle"
    pretrain(str(tiny_llama_path), train_examples, small_config(), out, data_name="suite", progress=False)
    return out


@pytest.fixture
def bundle_copy(pretrained, tmp_path):
    """A private copy of the pre-trained bundle that a test may change."""
    return shutil.copytree(pretrained, tmp_path / "bundle")


@pytest.fixture(scope="session")
def tiny_t5_path(tiny_llama_path, tmp_path_factory):
    """A tiny seeded T5-style encoder-decoder sharing the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(config).eval()
    out = tmp_path_factory.mktemp("models") / "tiny-t5"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
