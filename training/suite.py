"""The bundled task suite (v2): string skills, tasks that chain one to three of them, a fixed split.

Owns the skills, the task lists (training, validation and held-out tasks), the train / validation / test
split of words and the seeded generator of instances. Needs no download.

Every task is a distinct function of its input word: skills that commute or erase each other make many
chains equal ("upper.reverse" is "reverse.upper"), so the lists below keep one chain per function, and
any two tasks differ on at least a third of a sample of words (tests/training/test_suite.py checks every
pair). Validation and held-out tasks are new functions built from the training tasks' skills: validation
tasks choose learning rates and the zero-shot adapter, held-out tasks are only ever tested.

Prompts are "plain" by default ("kabadu ->", the same for every task: the adapter has to carry the task);
"named" prompts spell the chain out ("reverse then upper: kabadu ->").
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Collection
from pathlib import Path

from training.data import Example, write_jsonl

VOWELS = "aeiou"
_CONSONANTS = "bdgklmnprst"


def _shift(n: int) -> Callable[[str], str]:
    """Caesar shift of every letter by n places, keeping its case."""
    def shift(s: str) -> str:
        return "".join(chr((ord(c.lower()) - 97 + n) % 26 + 97).upper() if c.isupper() else
                       chr((ord(c) - 97 + n) % 26 + 97) for c in s)
    return shift


def _swap(s: str) -> str:
    """Swap the characters of every pair: "kabadu" -> "akabud"."""
    return "".join(s[i:i + 2][::-1] for i in range(0, len(s), 2))


SKILLS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "sort": lambda s: "".join(sorted(s)),
    "novowel": lambda s: "".join(c for c in s if c.lower() not in VOWELS),
    "rot1": lambda s: s[1:] + s[:1],
    "rot2": lambda s: s[2:] + s[:2],
    "double": lambda s: "".join(c + c for c in s),
    "shift1": _shift(1),
    "shift2": _shift(2),
    "swap": _swap,
    "dedupe": lambda s: "".join(dict.fromkeys(s)),
    "vowelup": lambda s: "".join(c.upper() if c in VOWELS else c for c in s),
    "mirror": lambda s: s + s[::-1],
    "dropfirst": lambda s: s[1:],
}

# Chosen once (seeded) from the 781 distinct chains of 1-3 different skills with at most one skill that
# doubles the length (double, mirror), keeping a chain only when it differs from every chain kept before
# on at least 30% of 64 sample words: every skill alone, 32 chains of two and 16 of three.
TRAIN_TASKS = (
    "reverse", "upper", "sort", "novowel", "rot1", "rot2", "double", "shift1", "shift2", "swap", "dedupe",
    "vowelup", "mirror", "dropfirst",
    "rot2.shift2", "dropfirst.reverse", "shift2.vowelup", "dedupe.mirror", "reverse.upper", "rot2.dropfirst",
    "rot1.mirror", "rot1.vowelup", "sort.rot1", "dedupe.vowelup", "upper.dropfirst", "rot2.vowelup",
    "upper.rot1", "rot2.shift1", "dropfirst.rot1", "novowel.mirror", "novowel.shift1", "sort.rot2",
    "double.rot1", "dropfirst.double", "reverse.rot1", "rot2.mirror", "reverse.novowel", "mirror.dropfirst",
    "dropfirst.mirror", "sort.vowelup", "reverse.mirror", "vowelup.dropfirst", "novowel.swap", "vowelup.sort",
    "upper.double", "swap.rot1",
    "sort.rot2.shift2", "shift2.swap.vowelup", "swap.double.vowelup", "rot1.rot2.dedupe", "swap.rot1.double",
    "upper.rot1.shift2", "rot1.double.shift1", "shift1.novowel.mirror", "rot1.swap.mirror",
    "novowel.rot1.mirror", "sort.shift2.dedupe", "rot2.vowelup.mirror", "upper.rot2.mirror",
    "sort.double.rot1", "dropfirst.mirror.rot1", "rot1.rot2.reverse",
)
VALIDATION_TASKS = ("rot2.dedupe", "dedupe.double", "shift2.swap", "upper.mirror", "sort.rot1.dedupe",
                    "rot1.dropfirst.sort", "upper.rot1.dedupe", "novowel.rot1.dedupe")
HELD_OUT_TASKS = ("dedupe.rot2", "sort.mirror", "rot1.reverse", "rot2.swap", "shift2.novowel", "shift2.mirror",
                  "dedupe.swap", "dropfirst.sort", "shift1.swap.mirror", "reverse.novowel.swap",
                  "rot2.dedupe.mirror", "shift1.shift2.dedupe", "vowelup.dropfirst.dedupe", "sort.swap.dropfirst",
                  "dedupe.double.vowelup", "rot1.rot2.mirror")
ALL_TASKS = TRAIN_TASKS + VALIDATION_TASKS + HELD_OUT_TASKS

PROMPT_STYLES = ("plain", "named")
SPLITS = ("train", "validation", "test")
WORD_BUCKETS = 5  # by a stable hash of the word: bucket 0 is test words, 1 validation words, the rest train


def apply(task: str, word: str) -> str:
    """The target of `task` ("a.b.c": skill a, then b, then c) on `word`."""
    for skill in task.split("."):
        word = SKILLS[skill](word)
    return word


def prompt(task: str, word: str, style: str = "plain") -> str:
    if style == "plain":
        return f"{word} ->"
    _check_style(style)
    return f"{' then '.join(task.split('.'))}: {word} ->"


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}: one of {', '.join(PROMPT_STYLES)}")


def split_of(word: str) -> str:
    """Train, validation and test instances never share a word: the split is a fixed function of the word."""
    bucket = zlib.crc32(word.encode()) % WORD_BUCKETS
    return SPLITS[2] if bucket == 0 else SPLITS[1] if bucket == 1 else SPLITS[0]


def random_word(rng: random.Random) -> str:
    """A made-up word of 2-3 consonant-vowel syllables (4-6 letters)."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))


def generate(task: str, n: int, seed: int, split: str = "train", style: str = "plain") -> list[Example]:
    """`n` instances of `task` on words of `split`, distinct words where the split has enough of them."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown suite task {task!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
    rng = random.Random(f"{seed}/{task}/{split}")
    examples, seen = [], set()
    for _ in range(1000 * n):
        if len(examples) == n:
            break
        word = random_word(rng)
        if split_of(word) == split and word not in seen:
            seen.add(word)
            examples.append(Example(task, prompt(task, word, style), apply(task, word)))
    return examples


def write_suite(out_dir: str | Path, n_train: int = 64, n_test: int = 32, n_shots: int = 64,
                seed: int = 0, style: str = "plain", only: Collection[str] | None = None) -> dict[str, Path]:
    """Write the suite's JSONL files into `out_dir`; returns them by name.

    train / test: the training tasks (n_train train words, n_test test words per task); heldout-train /
    heldout-test: the held-out tasks (a pool of n_shots train words / n_test test words per task);
    validation-train / validation-test: the validation tasks (n_shots train words / n_test validation words).
    `only` keeps the suite's tasks it names (each list in its own order), for a smaller suite.
    """
    _check_style(style)  # before anything is written
    if unknown := sorted(set(only or ()) - set(ALL_TASKS)):
        raise ValueError(f"unknown suite task(s) {unknown}")
    train, validation, held_out = ([t for t in tasks if only is None or t in only]
                                   for tasks in (TRAIN_TASKS, VALIDATION_TASKS, HELD_OUT_TASKS))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "train": (train, n_train, "train"),
        "test": (train, n_test, "test"),
        "heldout-train": (held_out, n_shots, "train"),
        "heldout-test": (held_out, n_test, "test"),
        "validation-train": (validation, n_shots, "train"),
        "validation-test": (validation, n_test, "validation"),
    }
    paths = {}
    for name, (tasks, n, split) in plan.items():
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], [ex for t in tasks for ex in generate(t, n, seed, split, style)])
    return paths
