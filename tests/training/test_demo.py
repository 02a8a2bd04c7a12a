"""The demo recipe's parts that need no training: the tokenizer and its chat template, the cache rule, the
served copy of the bundle, export-task's errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from transformers import AutoTokenizer
from typer.testing import CliRunner

import mhr
from training import backbone, cli, demo
from training import suite_v1 as suite


def test_tokenizer_is_character_level_and_round_trips():
    texts = [f"{ex.input} {ex.target}" for ex in suite.generate("reverse.upper", 20, seed=0)]
    tokenizer = backbone.train_tokenizer(texts)
    text = "reverse then upper: kabadu UDABAK"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(" K", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(c) for c in " K"]


def test_chat_renders_a_user_message_as_the_completion_prompt(tmp_path):
    texts = [f"{ex.input} {ex.target}" for ex in suite.generate("reverse.upper", 20, seed=0)]
    backbone.train_tokenizer(texts).save_pretrained(tmp_path)
    built = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    backbone.attach_chat_template(tmp_path)
    backbone.attach_chat_template(tmp_path)  # once is enough; the tokenizer's own files are left as built
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in built} == built
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    prompt = suite.prompt("reverse.upper", "kabadu")
    # as the server renders a chat request
    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True)
    assert list(chat["input_ids"]) == tokenizer(prompt).input_ids  # "<s>prompt", as a completion's prompt
    conversation = [{"role": "system", "content": "hi"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "A"}, {"role": "user", "content": "b"}]
    assert tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == \
        "<s>hi a A</s><s>b"  # training examples ("<s>prompt answer</s>") in a row


def test_backbone_heads_are_at_least_32_wide():
    recipe = demo.Recipe()
    config = backbone.backbone_config(recipe, backbone.train_tokenizer(["ab"]))
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


def finished_build(root: Path, bundle: Path, backbone: Path) -> Path:
    """A demo cache that `demo.build` takes as finished for the default recipe, around a small bundle."""
    shutil.copytree(bundle, root / "bundle")
    shutil.copytree(backbone, root / "backbone")
    marker = {"recipe_version": demo.RECIPE_VERSION, "recipe": asdict(demo.Recipe()), "root": str(root),
              "exact_match": {"a.b": 1.0}, "zero_shot_exact_match": {}, "seconds": 1.0}
    (root / demo.MARKER).write_text(json.dumps(marker))
    return root


def deploy(bundle_dir: Path, task: str) -> None:
    """What the admin route does to the served bundle: one more routed task, saved."""
    bundle = mhr.Bundle.load(bundle_dir)
    bundle.add_routed_task(task, bundle.routing_logits(bundle.task_names[0]))
    bundle.save(bundle_dir)


def test_a_deployed_task_outlives_the_next_demo_run(tmp_path, pretrained, tiny_llama_path):
    root = finished_build(tmp_path / "demo", pretrained, tiny_llama_path)
    first = CliRunner().invoke(cli.app, ["demo", "--cache-dir", str(root), "--quiet"])
    assert first.exit_code == 0, first.output
    assert f"served copy of the bundle: {root / 'serving'} (fresh" in first.output
    deploy(root / "serving", "reverse.sort")
    second = CliRunner().invoke(cli.app, ["demo", "--cache-dir", str(root), "--quiet"])
    assert second.exit_code == 0 and "(kept" in second.output
    assert "reverse.sort" in mhr.Bundle.load(root / "serving").task_names
    assert (root / "backbone" / "chat_template.jinja").read_text() == backbone.CHAT_TEMPLATE  # a cached build gains it
    reset = CliRunner().invoke(cli.app, ["demo", "--cache-dir", str(root), "--quiet", "--reset"])
    assert reset.exit_code == 0 and "(fresh" in reset.output
    assert "reverse.sort" not in mhr.Bundle.load(root / "serving").task_names


def test_a_rebuild_serves_a_fresh_copy(tmp_path, pretrained, tiny_llama_path):
    build = demo.cached(finished_build(tmp_path, pretrained, tiny_llama_path))
    serving, _ = demo.serving_copy(build)
    deploy(serving, "reverse.sort")
    assert demo.serving_copy(build) == (serving, False)
    marker = tmp_path / demo.MARKER
    marker.write_text(marker.read_text().replace('"seconds": 1.0', '"seconds": 2.0'))  # what a rebuild does
    assert demo.serving_copy(build) == (serving, True)  # another build's bundle: the copy starts again
    assert "reverse.sort" not in mhr.Bundle.load(serving).task_names
    assert not (tmp_path / f"{demo.SERVING}.partial").exists()
