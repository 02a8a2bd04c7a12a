"""The compositional suite: skills against hand-worked cases, the fixed split, deterministic generation."""

import pytest

from mhr.bundle_check import check_task_name
from training import suite
from training.data import read_jsonl


@pytest.mark.parametrize("task, word, target", [
    ("reverse.upper", "kalo", "OLAK"),
    ("upper.reverse", "kalo", "OLAK"),
    ("sort.rotate", "tuba", "btua"),         # sort: abtu, rotate: btua
    ("rotate.sort", "tuba", "abtu"),         # rotate: ubat, sort: abtu
    ("novowel.double", "kalo", "kkll"),
    ("double.reverse", "mi", "iimm"),
    ("upper.novowel", "dorime", "DRM"),      # vowels are dropped in either case
    ("double.rotate", "ba", "baab"),         # bbaa -> baab
    ("upper.sort", "baca", "AABC"),
])
def test_task_targets(task, word, target):
    assert suite.apply(task, word) == target


def test_split_holds_unseen_orders_of_seen_skills():
    train, held = set(suite.TRAIN_TASKS), set(suite.HELD_OUT_TASKS)
    assert not train & held and train | held == set(suite.ALL_TASKS)
    assert len(suite.ALL_TASKS) == len(suite.SKILLS) * (len(suite.SKILLS) - 1)
    for skill in suite.SKILLS:  # every skill is trained in both positions
        assert any(t.startswith(skill + ".") for t in train) and any(t.endswith("." + skill) for t in train)
    for task in suite.ALL_TASKS:
        check_task_name(task, where="suite")


def word_of(example):
    return example.input.rsplit(" ", 1)[-1]


def test_generation_is_seeded_and_splits_words():
    first = suite.generate("sort.double", 20, seed=3)
    assert first == suite.generate("sort.double", 20, seed=3)
    assert first != suite.generate("sort.double", 20, seed=4)
    test = suite.generate("sort.double", 20, seed=3, test=True)
    assert not {word_of(ex) for ex in first} & {word_of(ex) for ex in test}
    for ex in first:
        assert ex.input == f"sort then double: {word_of(ex)}"
        assert ex.target == suite.apply("sort.double", word_of(ex)) != ""


def test_write_suite_files(tmp_path):
    paths = suite.write_suite(tmp_path, n_train=3, n_test=2, n_shots=1, seed=0)
    counts = {name: len(read_jsonl(path)) for name, path in paths.items()}
    n_train, n_held = len(suite.TRAIN_TASKS), len(suite.HELD_OUT_TASKS)
    assert counts == {"train": 3 * n_train, "test": 2 * n_train, "heldout-train": n_held, "heldout-test": 2 * n_held}
    assert {ex.task for ex in read_jsonl(paths["heldout-test"])} == set(suite.HELD_OUT_TASKS)


def test_plain_prompts_say_nothing_of_the_task():
    named = suite.generate("sort.double", 5, seed=3)
    plain = suite.generate("sort.double", 5, seed=3, style="plain")
    assert [(e.target, e.input.split()[-1]) for e in plain] == [(e.target, e.input.split()[-1]) for e in named]
    assert {e.input.replace(e.input.split()[-1], "") for e in plain} == {"word: "}
    assert "sort" not in plain[0].input and "sort then double" in named[0].input
    with pytest.raises(ValueError, match="prompt style"):
        suite.prompt("sort.double", "kabadu", "terse")
