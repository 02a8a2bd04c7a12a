"""End to end on the suite with the tiny model: MHR pre-training lowers the loss, a held-out task is
adapted with MHR-z, and the bundle evaluates, all with device="cpu" given explicitly."""

import mhr
from tests.training.conftest import small_config
from training import suite
from training.adapt import adapt
from training.data import read_jsonl
from training.evaluate import evaluate_bundle
from training.pretrain import pretrain

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_pretrain_adapt_eval(tiny_llama_path, suite_files, tmp_path):
    tasks = suite.TRAIN_TASKS[:6]
    examples = [ex for ex in read_jsonl(suite_files["train"]) if ex.task in tasks]
    config = small_config(skills=4, heads=2, rank=4, alpha=8.0, target_modules=TARGETS, steps=30,
                          batch_size=8, warmup_steps=3, lr=1e-2)
    bundle, result = pretrain(str(tiny_llama_path), examples, config, tmp_path / "b", data_name="suite",
                              progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.1, (first, last)
    assert bundle.task_names == sorted(tasks)
    assert bundle.backbone == str(tiny_llama_path.resolve())  # loads from any working directory
    assert mhr.Bundle.load(tmp_path / "b").training["final_loss"] == result.final_loss

    held = suite.HELD_OUT_TASKS[0]
    shots = [ex for ex in read_jsonl(suite_files["heldout-train"]) if ex.task == held]
    adapt(tmp_path / "b", shots, held, small_config(method="mhr-z", steps=3), progress=False)

    test = [ex for ex in read_jsonl(suite_files["heldout-test"]) if ex.task == held]
    test += [ex for ex in read_jsonl(suite_files["test"]) if ex.task == tasks[0]]
    report = evaluate_bundle(tmp_path / "b", test, max_new_tokens=8, device="cpu")
    assert set(report["tasks"]) == {held, tasks[0]}
    assert all(0.0 <= s["rouge_l"] <= 1.0 and s["n"] == 4 for s in report["tasks"].values())
