"""The task suite (v2): skills against hand-worked cases, every task a distinct function, the fixed split,
deterministic generation."""

import random
from itertools import combinations

import pytest

from mhr.bundle_check import check_task_name
from training import suite
from training.data import read_jsonl


@pytest.mark.parametrize("task, word, target", [
    ("reverse.upper", "kalo", "OLAK"),
    ("sort.rot1", "tuba", "btua"),           # sort: abtu, rot1: btua
    ("swap", "kabadu", "akabud"),
    ("shift1", "kazu", "lbav"),              # z wraps to a
    ("shift2.vowelup", "kalo", "mcnq"),      # shift2: mcnq, no vowel left to raise
    ("dedupe.mirror", "kaka", "kaak"),
    ("rot2.dropfirst", "kalomi", "omika"),   # rot2: lomika, dropfirst: omika
    ("novowel.mirror", "dorime", "drmmrd"),
    ("upper.rot1.shift2", "ba", "CD"),       # BA, AB, CD
    ("rot1.rot2.reverse", "kalomi", "lakimo"),  # alomik, omikal, lakimo
])
def test_task_targets(task, word, target):
    assert suite.apply(task, word) == target


def test_every_pair_of_tasks_computes_different_functions():
    """No task is another in disguise: any two differ on some (in fact many) of 64 random words."""
    rng = random.Random(12345)
    words = [suite.random_word(rng) for _ in range(64)]
    outputs = {task: [suite.apply(task, w) for w in words] for task in suite.ALL_TASKS}
    for a, b in combinations(suite.ALL_TASKS, 2):
        differ = sum(x != y for x, y in zip(outputs[a], outputs[b], strict=True))
        assert differ >= len(words) // 5, f"{a} and {b} agree on {len(words) - differ} of {len(words)} words"
    assert all(o for out in outputs.values() for o in out)  # no empty answer


def test_split_holds_new_functions_of_seen_skills():
    train, valid, held = set(suite.TRAIN_TASKS), set(suite.VALIDATION_TASKS), set(suite.HELD_OUT_TASKS)
    assert len(train) == len(suite.TRAIN_TASKS) >= 48 and len(held) >= 12 and len(valid) >= 6
    assert not train & held and not train & valid and not valid & held
    seen = {skill for task in train for skill in task.split(".")}
    assert seen == set(suite.SKILLS)
    for task in suite.ALL_TASKS:
        check_task_name(task, where="suite")
        skills = task.split(".")
        assert 1 <= len(skills) <= 3 and len(set(skills)) == len(skills) and set(skills) <= seen
    for task in valid | held:
        assert len(task.split(".")) >= 2  # a composition: no single skill is held out


def test_generation_is_seeded_and_splits_words():
    first = suite.generate("sort.rot1", 20, seed=3)
    assert first == suite.generate("sort.rot1", 20, seed=3)
    assert first != suite.generate("sort.rot1", 20, seed=4)
    words = {split: {ex.input.split()[0] for ex in suite.generate("sort.rot1", 20, 3, split)}
             for split in suite.SPLITS}
    assert all(len(w) == 20 for w in words.values())  # distinct words
    assert not words["train"] & words["test"] and not words["train"] & words["validation"] \
        and not words["validation"] & words["test"]
    for ex in first:
        word = ex.input.split()[0]
        assert ex.input == f"{word} ->" and ex.target == suite.apply("sort.rot1", word)
    with pytest.raises(ValueError, match="split"):
        suite.generate("sort.rot1", 1, 0, split="dev")


def test_write_suite_files(tmp_path):
    paths = suite.write_suite(tmp_path, n_train=3, n_test=2, n_shots=4, seed=0)
    counts = {name: len(read_jsonl(path)) for name, path in paths.items()}
    n_train, n_valid, n_held = len(suite.TRAIN_TASKS), len(suite.VALIDATION_TASKS), len(suite.HELD_OUT_TASKS)
    assert counts == {"train": 3 * n_train, "test": 2 * n_train, "heldout-train": 4 * n_held,
                      "heldout-test": 2 * n_held, "validation-train": 4 * n_valid, "validation-test": 2 * n_valid}
    assert {ex.task for ex in read_jsonl(paths["heldout-test"])} == set(suite.HELD_OUT_TASKS)


def test_write_suite_keeps_only_the_tasks_named(tmp_path):
    only = ("sort.rot1", "upper", "rot1.dropfirst.sort", "dropfirst.sort")
    paths = suite.write_suite(tmp_path, n_train=1, n_test=1, n_shots=1, only=only)
    tasks = {name: [ex.task for ex in read_jsonl(path)] for name, path in paths.items()}
    assert tasks["train"] == ["upper", "sort.rot1"]  # the suite's order
    assert tasks["validation-test"] == ["rot1.dropfirst.sort"] and tasks["heldout-test"] == ["dropfirst.sort"]
    with pytest.raises(ValueError, match="no.such"):
        suite.write_suite(tmp_path, only=("no.such",))


def test_named_prompts_spell_out_the_chain():
    plain = suite.generate("sort.rot1", 5, seed=3)
    named = suite.generate("sort.rot1", 5, seed=3, style="named")
    assert [e.target for e in plain] == [e.target for e in named]
    assert named[0].input == f"sort then rot1: {plain[0].input}"
    assert "sort" not in plain[0].input
    with pytest.raises(ValueError, match="prompt style"):
        suite.prompt("sort.rot1", "kabadu", "terse")
