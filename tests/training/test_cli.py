"""The `mhr` command line: a run from suite to eval, one-line errors for bad input, plugin commands."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from training import cli

runner = CliRunner()
SMALL = ["--steps", "2", "--batch-size", "4", "--max-length", "48", "--device", "cpu", "--quiet"]


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.mark.parametrize("command", ["suite", "train", "adapt", "zeroshot", "eval", "plot", "demo", "export-task"])
def test_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output
    assert ("--device" in result.output) == (command in ("train", "adapt", "zeroshot", "eval"))


@pytest.mark.parametrize("command", ["suite", "train", "adapt", "zeroshot", "eval", "plot", "demo", "export-task"])
def test_help_shows_what_applies_to_each_option_left_out(command):
    """Every option's row in --help is required or names its default (its own, or TrainConfig's)."""
    result = runner.invoke(cli.app, [command, "--help"], env={"COLUMNS": "400"})  # one row per option
    rows = {}  # an option's row, by the first option named in it (the others are in its help text)
    for line in result.output.splitlines():
        names = [word for word in line.split() if word.startswith("--")]
        if line.startswith("│") and names:
            rows.setdefault(names[0], line)
    params = typer.main.get_command(cli.app).commands[command].params
    for option in [p.opts[0] for p in params if p.opts[0] != "--help"]:
        assert "[required]" in rows[option] or "default: " in rows[option], rows[option]


def test_suite_train_adapt_zeroshot_eval_plot(tmp_path, tiny_llama_path):
    assert invoke("suite", "--out", tmp_path / "s", "--n-train", 2, "--n-test", 1, "--n-shots", 2).exit_code == 0
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"skills": 2, "heads": 2, "rank": 2, "steps": 50}))  # --steps overrides
    result = invoke("train", "--model", tiny_llama_path, "--data", tmp_path / "s" / "train.jsonl",
                    "--out", tmp_path / "b", "--config", config, "--target-modules", "q_proj,v_proj", *SMALL)
    assert result.exit_code == 0, result.output
    assert "2 steps" in result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["config"]["n_skills"] == 2 and manifest["training"]["steps"] == 2
    assert manifest["training"]["config"]["device"] == "cpu"  # --device reached the run's TrainConfig
    held = "dedupe.rot2"  # a held-out task of the suite
    # heldout-train holds several tasks: adapting one of them names the first record of another
    result = invoke("adapt", "--bundle", tmp_path / "b", "--data", tmp_path / "s" / "heldout-train.jsonl",
                    "--task", held, *SMALL)
    assert result.exit_code == 2 and "heldout-train.jsonl:" in result.output and "unknown task" in result.output
    only = tmp_path / "held.jsonl"
    lines = (tmp_path / "s" / "heldout-train.jsonl").read_text().splitlines()
    only.write_text("\n".join(line for line in lines if json.loads(line)["task"] == held) + "\n")
    result = invoke("adapt", "--bundle", tmp_path / "b", "--data", only, "--task", held, "--method", "mhr-z", *SMALL)
    assert result.exit_code == 0, result.output
    result = invoke("zeroshot", "--bundle", tmp_path / "b", "--data", tmp_path / "s" / "train.jsonl",
                    "--validation-data", tmp_path / "s" / "validation-test.jsonl", "--eval-every", 1, *SMALL)
    assert result.exit_code == 0, result.output
    assert "validation exact match: backbone " in result.output and "stored: " in result.output
    result = invoke("eval", "--bundle", tmp_path / "b", "--data", tmp_path / "s" / "heldout-test.jsonl",
                    "--task", held, "--out", tmp_path / "report.json", "--max-new-tokens", 4,
                    "--model", tiny_llama_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["tasks"]) == [held] and "average" in result.output
    result = invoke("eval", "--bundle", tmp_path / "b", "--data", tmp_path / "s" / "heldout-test.jsonl")
    assert result.exit_code == 2 and "not in the bundle" in result.output
    result = invoke("plot", "--bundle", tmp_path / "b", "--out", tmp_path / "routing.png")
    assert result.exit_code == 0 and (tmp_path / "routing.png").stat().st_size > 0


def test_superni_files_from_train_to_eval(tmp_path, tiny_llama_path):
    """The paper's data format: train on a split's tasks, adapt a test task from its file, eval by ROUGE-L."""
    from tests.training.test_data import SUPERNI
    result = invoke("train", "--model", tiny_llama_path, "--data", SUPERNI / "splits/default/train_tasks.txt",
                    "--out", tmp_path / "b", "--skills", 2, "--heads", 2, "--rank", 2,
                    "--target-modules", "q_proj,v_proj", "--max-per-task", 2, *SMALL)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["training"]["examples"] == 2
    result = invoke("adapt", "--bundle", tmp_path / "b", "--data", SUPERNI / "tasks/task002_toy_plurals.json",
                    "--task", "task002_toy_plurals", "--shots", 2, "--method", "mhr-z", *SMALL)
    assert result.exit_code == 0, result.output
    result = invoke("eval", "--bundle", tmp_path / "b", "--data", SUPERNI / "splits/default/test_tasks.txt",
                    "--max-new-tokens", 4, "--out", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tasks"]["task002_toy_plurals"]["n"] == 4 and "rouge_l" in report["average"]


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "m", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/b"], "bad.jsonl:2: invalid JSON"),
    (["train", "--model", "m", "--data", "{tmp}/good.jsonl", "--out", "{tmp}/b", "--steps", "0"], "steps must be"),
    (["train", "--model", "m", "--data", "{tmp}/good.jsonl", "--out", "{tmp}/b", "--method", "mhr-z"],
     "train takes method"),
    (["train", "--model", "{tmp}/no-model", "--data", "{tmp}/good.jsonl", "--out", "{tmp}/b",
      "--target-modules", "q_proj"], "cannot load the backbone"),
    (["adapt", "--bundle", "{tmp}/none", "--data", "{tmp}/good.jsonl", "--task", "t1"], "bundle directory not found"),
    (["eval", "--bundle", "{tmp}", "--data", "{tmp}/missing.jsonl"], "missing.jsonl: cannot read"),
    (["train", "--model", "m", "--data", "{tmp}/good.jsonl", "--out", "{tmp}/b", "--device", "tpu"],
     "device must be auto, cpu, cuda, cuda:N or mps"),
    (["eval", "--bundle", "{tmp}", "--data", "{tmp}/good.jsonl", "--device", "tpu"], "device must be"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    (tmp_path / "good.jsonl").write_text('{"task": "t1", "input": "a", "target": "b"}\n')
    (tmp_path / "bad.jsonl").write_text('{"task": "t1", "input": "a", "target": "b"}\n{"task": \n')
    result = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [
    ["train", "--model", "m", "--out", "{tmp}/b"],
    ["adapt", "--bundle", "{tmp}/b", "--task", "t1"],
    ["zeroshot", "--bundle", "{tmp}/b"],
    ["eval", "--bundle", "{tmp}/b"],
])
def test_cuda_without_cuda_is_refused_before_any_work(tmp_path, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "good.jsonl").write_text('{"task": "t1", "input": "a", "target": "b"}\n')
    result = invoke(*[a.format(tmp=tmp_path) for a in command], "--data", tmp_path / "good.jsonl", "--device", "cuda")
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "CUDA is not available" in result.output


def test_other_packages_add_commands(monkeypatch, capsys):
    class Entry:
        name = "hello"

        @staticmethod
        def load():
            def hello(name: str = "world") -> None:
                """Say hello."""
                print(f"hello {name}")
            return hello

    monkeypatch.setattr(cli, "entry_points", lambda group: [Entry] if group == cli.PLUGIN_GROUP else [])
    monkeypatch.setattr(cli, "app", cli.typer.Typer())  # a fresh app, so the real one is not changed
    cli.app.command()(cli.suite)
    monkeypatch.setattr("sys.argv", ["mhr", "hello", "--name", "you"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    assert capsys.readouterr().out == "hello you\n"


def test_suite_prompt_styles(tmp_path):
    assert invoke("suite", "--out", tmp_path / "named", "--n-train", 1, "--prompts", "named").exit_code == 0
    first = json.loads((tmp_path / "named" / "train.jsonl").read_text().splitlines()[0])
    assert first["input"].startswith(f"{first['task']}: ")  # the first task is a single skill
    result = invoke("suite", "--out", tmp_path / "bad", "--prompts", "terse")
    assert result.exit_code == 2 and "terse" in result.output and "plain" in result.output
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_quiet_hides_transformers_progress_bars_too(bundle_copy, suite_files, tmp_path):
    shots = tmp_path / "shots.jsonl"
    lines = suite_files["heldout-train"].read_text().splitlines()
    shots.write_text("\n".join(line for line in lines if json.loads(line)["task"] == "dedupe.rot2") + "\n")
    args = ["adapt", "--bundle", bundle_copy, "--data", shots, "--task", "dedupe.rot2", "--steps", 1,
            "--max-length", 48, "--device", "cpu"]
    shown = invoke(*args)  # bars are shown where the output is captured: the check below can see them
    quiet = invoke(*args, "--replace", "--quiet")
    assert shown.exit_code == 0 and quiet.exit_code == 0, quiet.output
    assert "Loading weights" in shown.output and "it/s]" in shown.output
    assert "it/s]" not in quiet.output and "Loading weights" not in quiet.output
    assert quiet.output.startswith("task 'dedupe.rot2' added")
