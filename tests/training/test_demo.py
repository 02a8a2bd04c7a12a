"""The demo recipe's parts that need no training: the tokenizer, the cache rule, export-task's errors."""

from __future__ import annotations

import json
from dataclasses import asdict

from typer.testing import CliRunner

from training import cli, demo, suite


def test_tokenizer_is_character_level_and_round_trips():
    texts = [f"{ex.input} {ex.target}" for ex in suite.generate("reverse.upper", 20, seed=0)]
    tokenizer = demo.train_tokenizer(texts)
    text = "reverse then upper: kabadu UDABAK"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(" K", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(c) for c in " K"]


def test_backbone_heads_are_at_least_32_wide():
    recipe = demo.Recipe()
    config = demo.backbone_config(recipe, demo.train_tokenizer(["ab"]))
    assert config.head_dim >= 32 and config.num_attention_heads * config.head_dim == config.hidden_size


def test_cache_needs_the_same_recipe_and_version(tmp_path):
    recipe = demo.Recipe(seed=3)
    assert demo.cached(tmp_path, recipe) is None  # nothing built
    marker = {"recipe_version": demo.RECIPE_VERSION, "recipe": asdict(recipe), "root": str(tmp_path),
              "exact_match": {"a.b": 1.0}, "zero_shot_exact_match": {}, "seconds": 1.0}
    (tmp_path / demo.MARKER).write_text(json.dumps(marker))
    assert demo.cached(tmp_path, recipe).exact_match == {"a.b": 1.0}
    assert demo.cached(tmp_path, recipe.scaled(backbone_steps=1)) is None
    (tmp_path / demo.MARKER).write_text(json.dumps({**marker, "recipe_version": demo.RECIPE_VERSION + 1}))
    assert demo.cached(tmp_path, recipe) is None


def test_export_task_names_the_bundle_and_task(tmp_path, pretrained):
    bundle_dir = pretrained
    result = CliRunner().invoke(cli.app, ["export-task", "--bundle", str(bundle_dir), "--task", "no.such",
                                          "--out", str(tmp_path / "t.safetensors")])
    assert result.exit_code == 2 and result.output.startswith("error: ")
    assert str(bundle_dir) in result.output and "no.such" in result.output
    result = CliRunner().invoke(cli.app, ["export-task", "--bundle", str(tmp_path / "none"), "--task", "a",
                                          "--out", str(tmp_path / "t.safetensors")])
    assert result.exit_code == 2 and "not found" in result.output


def test_backbone_pretraining_is_deterministic(tmp_path):
    recipe = demo.Recipe(hidden=64, heads=2, layers=1, intermediate=64, backbone_examples=2, backbone_steps=2,
                         backbone_batch=4, backbone_warmup=1)
    first = demo.pretrain_backbone(recipe, tmp_path / "a", log=lambda _: None)
    second = demo.pretrain_backbone(recipe, tmp_path / "b", log=lambda _: None)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
