"""Metrics against hand-computed values, rank classification against transformers' loss, bundle evaluation."""

import pytest
import torch

import mhr
from training.data import DataError, Example
from training.evaluate import average, best_of, choose, evaluate_bundle, exact_match, format_table, rouge_l


@pytest.mark.parametrize("prediction, target, expected", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),   # LCS "the cat on the mat": P = R = 5/6
    ("a b c d", "a c e", 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)),  # LCS "a c"
    ("x y", "y x", 0.5),                                         # LCS of length 1: P = R = 1/2
    ("The Cat", "the cat", 1.0),                                 # case-insensitive
    ("a b", "c d", 0.0),
    ("", "a", 0.0),
    ("", "", 1.0),
    ("Dark.", "dark", 1.0),                                      # punctuation separates tokens (ROUGE's tokenizer)
    ("don't go", "don t go", 1.0),
])
def test_rouge_l(prediction, target, expected):
    assert rouge_l(prediction, target) == pytest.approx(expected)


def test_exact_match_ignores_whitespace_only():
    assert exact_match("  OLAK ", "OLAK") == 1.0
    assert exact_match("a  b", "a b") == 1.0
    assert exact_match("olak", "OLAK") == 0.0


def test_the_best_answer_counts():
    examples = [Example("t", "x", "dark", references=("heavy",)), Example("t", "y", "late")]
    assert best_of(exact_match, ["heavy", "late"], examples) == 1.0
    assert best_of(rouge_l, ["dark heavy", "early"], examples) == pytest.approx((2 / 3 + 0) / 2)


def test_average_is_over_tasks_and_metrics_they_have():
    results = {"a": {"n": 10, "exact_match": 1.0}, "b": {"n": 1, "exact_match": 0.0, "accuracy": 0.5}}
    assert average(results) == {"accuracy": 0.5, "exact_match": 0.5}


def test_choose_picks_the_most_likely_choice(tiny_llama, tiny_tokenizer):
    example = Example("t", "Input: kalo Output:", "OLAK", ("OLAK", "kalo", "sum of 3"))
    picked = choose(tiny_llama, tiny_tokenizer, example, max_length=64)
    losses = []  # reference: transformers' mean loss times the number of label tokens, per choice
    for choice in example.choices:
        prompt = tiny_tokenizer(example.input)["input_ids"]
        answer = tiny_tokenizer(" " + choice, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
        with torch.no_grad():
            mean = tiny_llama(input_ids=torch.tensor([prompt + answer]),
                              labels=torch.tensor([[-100] * len(prompt) + answer])).loss
        losses.append(float(mean) * len(answer))
    assert picked == example.choices[min(range(3), key=losses.__getitem__)]


def test_evaluate_bundle_per_task_and_zero_shot(pretrained, suite_files):
    from training.data import read_jsonl
    bundle = mhr.Bundle.load(pretrained)
    tasks = bundle.task_names[:2]
    examples = [ex for ex in read_jsonl(suite_files["test"]) if ex.task in tasks]
    ranked = Example(tasks[0], "pick one:", "yes", ("yes", "no"))
    report = evaluate_bundle(pretrained, [*examples, ranked], max_new_tokens=4)
    assert report["adapter"] == "task" and list(report["tasks"]) == tasks
    assert report["tasks"][tasks[0]]["n"] == 5 and "accuracy" in report["tasks"][tasks[0]]
    assert set(report["tasks"][tasks[1]]) == {"n", "exact_match", "rouge_l", "loss"}
    assert set(report["average"]) == {"accuracy", "exact_match", "rouge_l", "loss"}
    table = format_table(report)
    assert table.splitlines()[0].split() == ["task", "n", "accuracy", "exact_match", "loss", "rouge_l"]
    assert table.splitlines()[-1].startswith("average")

    unseen = [Example("not.in.bundle", "x", "y")]
    with pytest.raises(DataError, match="not in the bundle"):
        evaluate_bundle(pretrained, unseen)
    assert evaluate_bundle(pretrained, unseen, zero_shot=True, max_new_tokens=2)["adapter"] == "zero-shot"
