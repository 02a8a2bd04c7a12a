"""The demo: its build (seeded, on the shipped backbone, cached), the shipped tokenizer it serves, the served
copy of the bundle, export-task's errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

import mhr
from training import backbone, cli, demo, suite

# Two training tasks, a validation task and a held-out task, a few steps: the build's every step, in seconds.
SMALL = demo.Recipe(tasks=("upper", "sort.rot1", "rot1.dropfirst.sort", "dropfirst.sort"), n_train=4, n_test=2,
                    n_shots=2, skills=2, mhr_heads=2, rank=2, mhr_steps=2, zeroshot_steps=2, zeroshot_eval_every=1)


def test_the_shipped_tokenizer_is_character_level_and_round_trips():
    tokenizer = AutoTokenizer.from_pretrained(backbone.SHIPPED)
    text = "kabadu -> UDABAK"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_renders_a_user_message_as_the_completion_prompt(tmp_path):
    shutil.copytree(backbone.SHIPPED, tmp_path, dirs_exist_ok=True)
    built = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    backbone.attach_chat_template(tmp_path)  # already there: every file stays as shipped
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == built
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


def test_the_demo_tasks_are_suite_tasks_of_its_skills():
    assert set(demo.TASKS) & set(suite.TRAIN_TASKS) and set(demo.TASKS) & set(suite.HELD_OUT_TASKS)
    assert set(demo.TASKS) & set(suite.VALIDATION_TASKS)
    assert all(set(t.split(".")) <= set(demo.SKILLS) for t in demo.TASKS)


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory) -> tuple[demo.DemoBuild, demo.DemoBuild]:
    root = tmp_path_factory.mktemp("demo")
    return tuple(demo.build(root / name, SMALL, progress=False, log=lambda _: None) for name in ("a", "b"))


def test_a_build_is_seeded_and_leaves_the_backbone_as_shipped(small_builds):
    first, second = small_builds
    files = sorted(p.name for p in first.bundle.iterdir())
    assert files == sorted(p.name for p in second.bundle.iterdir())
    assert all((first.bundle / f).read_bytes() == (second.bundle / f).read_bytes()
               for f in files if f.endswith(".safetensors"))
    assert (first.exact_match, first.zero_shot_exact_match) == (second.exact_match, second.zero_shot_exact_match)
    assert set(first.exact_match) == {"upper", "sort.rot1"} and set(first.zero_shot_exact_match) == {"dropfirst.sort"}
    assert all((first.backbone / p.name).read_bytes() == p.read_bytes() for p in backbone.SHIPPED.iterdir())
    served = mhr.Bundle.load(first.bundle)
    assert served.training["zero_shot"]["validation_tasks"] == ["rot1.dropfirst.sort"]
    assert Path(served.backbone) == first.backbone.resolve()


def test_a_build_is_reused_for_its_recipe_only(small_builds, monkeypatch):
    built = small_builds[0]
    assert demo.build(built.root, SMALL, log=lambda _: None).seconds == built.seconds  # reused, not rebuilt
    assert demo.cached(built.root, SMALL) is not None
    assert demo.cached(built.root, demo.Recipe(**{**asdict(SMALL), "seed": 1})) is None
    monkeypatch.setattr(demo, "backbone_hash", lambda: "another backbone")  # after `make backbone`
    assert demo.cached(built.root, SMALL) is None


def test_cache_needs_the_same_recipe_and_version(tmp_path):
    recipe = demo.Recipe(seed=3)
    assert demo.cached(tmp_path, recipe) is None  # nothing built
    marker = {"recipe_version": demo.RECIPE_VERSION, "backbone_sha256": demo.backbone_hash(),
              "recipe": asdict(recipe), "root": str(tmp_path), "exact_match": {"a.b": 1.0},
              "zero_shot_exact_match": {}, "seconds": 1.0}
    (tmp_path / demo.MARKER).write_text(json.dumps(marker))
    assert demo.cached(tmp_path, recipe).exact_match == {"a.b": 1.0}
    assert demo.cached(tmp_path, demo.Recipe(seed=3, mhr_steps=1)) is None
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


def finished_build(root: Path, bundle: Path, backbone: Path) -> Path:
    """A demo cache that `demo.build` takes as finished for the default recipe, around a small bundle."""
    shutil.copytree(bundle, root / "bundle")
    shutil.copytree(backbone, root / "backbone")
    marker = {"recipe_version": demo.RECIPE_VERSION, "backbone_sha256": demo.backbone_hash(),
              "recipe": asdict(demo.Recipe()), "root": str(root), "exact_match": {"a.b": 1.0},
              "zero_shot_exact_match": {}, "seconds": 1.0}
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
