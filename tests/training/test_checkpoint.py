"""Checkpoints: a run interrupted and resumed ends with exactly the weights of an uninterrupted one."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.training.test_loop import adapter_state, make_run
from training import checkpoint
from training.loop import train


class Crash(Exception):
    pass


def run(model_path, tokenizer, examples, checkpoint_dir=None):
    model = AutoModelForCausalLM.from_pretrained(model_path)
    # relaxed routing stays on: resuming must also restore the RNG stream it samples from
    config, data = make_run(model, tokenizer, examples, steps=6, warmup_steps=2, schedule="cosine",
                            save_every=2 if checkpoint_dir else 0, checkpoint_dir=checkpoint_dir)
    result = train(model, data, config, progress=False)
    return adapter_state(model), result


def test_resume_reproduces_the_uninterrupted_run(tiny_llama_path, tiny_tokenizer, train_examples, tmp_path,
                                                 monkeypatch):
    straight, _ = run(tiny_llama_path, tiny_tokenizer, train_examples)

    real_save = checkpoint.save

    def save_then_crash(directory, step, *args):
        real_save(directory, step, *args)
        if step == 4:
            raise Crash

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(Crash):
        run(tiny_llama_path, tiny_tokenizer, train_examples, tmp_path / "ckpt")
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path / "ckpt").name == "step-00000004"

    resumed, result = run(tiny_llama_path, tiny_tokenizer, train_examples, tmp_path / "ckpt")
    assert result.steps == 6 and len(result.losses) == 2  # only steps 5 and 6 ran after the restart
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def test_checkpoints_hold_no_pickle_and_old_ones_go(tiny_llama_path, tiny_tokenizer, train_examples, tmp_path):
    finished, _ = run(tiny_llama_path, tiny_tokenizer, train_examples, tmp_path / "ckpt")
    again, result = run(tiny_llama_path, tiny_tokenizer, train_examples, tmp_path / "ckpt")
    assert result.steps == 6 and result.final_loss is None and "no step run" in result.summary()
    assert all(torch.equal(again[n], finished[n]) for n in finished)
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert kept == ["step-00000004", "step-00000006"]
    assert sorted(p.name for p in (tmp_path / "ckpt" / kept[-1]).iterdir()) == ["state.json", "tensors.safetensors"]
    state = json.loads((tmp_path / "ckpt" / kept[-1] / "state.json").read_text())
    assert state["step"] == 6 and state["scheduler"]["last_epoch"] == 6
