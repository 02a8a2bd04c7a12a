"""The first task suite (v1): string skills, tasks that chain two of them, a fixed split.

Kept for the demo's recipe until the demo moves to `training.suite` (v2); its held-out tasks compute the same
functions as training tasks (skills that commute), which is why v2 replaced it for the experiments.

Owns the skills, the task list and its train / held-out split, and the seeded generator of instances.
A task "a.b" applies skill a then skill b to a short made-up word; held-out tasks are unseen orders of
seen skills, so a router that learned which skill does what can compose them. Prompts either name the
two skills ("named": the instruction alone says what to do, which zero-shot needs) or are the same for
every task ("plain": only the adapter knows the task, so routing has to carry it). Needs no download.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from itertools import permutations
from pathlib import Path

from training.data import Example, write_jsonl

VOWELS = set("aeiouAEIOU")

SKILLS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "sort": lambda s: "".join(sorted(s)),
    "novowel": lambda s: "".join(c for c in s if c not in VOWELS),
    "rotate": lambda s: s[1:] + s[:1],
    "double": lambda s: "".join(c + c for c in s),
}

# Each skill comes first in one held-out task and second in another, and in four training tasks each way.
HELD_OUT_TASKS = ("reverse.sort", "upper.rotate", "sort.double", "novowel.reverse", "rotate.upper",
                  "double.novowel")
ALL_TASKS = tuple(f"{a}.{b}" for a, b in permutations(SKILLS, 2))
TRAIN_TASKS = tuple(t for t in ALL_TASKS if t not in HELD_OUT_TASKS)

_CONSONANTS = "bdgklmnprst"
_VOWEL_LIST = "aeiou"
TEST_BUCKETS = 5  # one word in five (by a stable hash) is reserved for test files
PROMPT_STYLES = ("named", "plain")


def apply(task: str, word: str) -> str:
    """The target of `task` ("a.b": skill a, then skill b) on `word`."""
    first, second = task.split(".")
    return SKILLS[second](SKILLS[first](word))


def prompt(task: str, word: str, style: str = "named") -> str:
    if style == "plain":
        return f"word: {word}"
    _check_style(style)
    first, second = task.split(".")
    return f"{first} then {second}: {word}"


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}: one of {', '.join(PROMPT_STYLES)}")


def is_test_word(word: str) -> bool:
    """Train and test instances never share a word: the split is a fixed function of the word."""
    return zlib.crc32(word.encode()) % TEST_BUCKETS == 0


def generate(task: str, n: int, seed: int, test: bool = False, style: str = "named") -> list[Example]:
    """`n` instances of `task` from words of 2-3 consonant-vowel syllables (so never without consonants)."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown suite task {task!r}")
    rng = random.Random(f"{seed}/{task}/{'test' if test else 'train'}")
    examples = []
    while len(examples) < n:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWEL_LIST) for _ in range(rng.randint(2, 3)))
        if is_test_word(word) == test:
            examples.append(Example(task, prompt(task, word, style), apply(task, word)))
    return examples


def write_suite(out_dir: str | Path, n_train: int = 64, n_test: int = 16, n_shots: int = 16,
                seed: int = 0, style: str = "named") -> dict[str, Path]:
    """Write the suite's four JSONL files into `out_dir`; returns them by name.

    train.jsonl / test.jsonl: the training tasks (n_train / n_test per task); heldout-train.jsonl /
    heldout-test.jsonl: the held-out tasks (n_shots few-shot instances / n_test per task).
    """
    _check_style(style)  # before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "train": (TRAIN_TASKS, n_train, False),
        "test": (TRAIN_TASKS, n_test, True),
        "heldout-train": (HELD_OUT_TASKS, n_shots, False),
        "heldout-test": (HELD_OUT_TASKS, n_test, True),
    }
    paths = {}
    for name, (tasks, n, test) in plan.items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], [ex for t in tasks for ex in generate(t, n, seed, test, style)])
    return paths
