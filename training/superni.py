"""Super-NaturalInstructions task files as training data, and `read_data`, which picks the reader by path.

Owns the benchmark's layout as its repository ships it (allenai/natural-instructions):

    tasks/task001_quoref_question_generation.json     one task: Definition, Positive Examples, Instances, ...
    splits/default/train_tasks.txt                     task names, one a line (the file stem)
    splits/default/test_tasks.txt

and the prompt of the paper's experiments: the definition and two positive examples, then the instance
("Definition / Positive Example / Now complete the following example"). An instance's first output is the
training target; all of its outputs are reference answers for evaluation (ROUGE-L and exact match take the
best match, as the benchmark's own metric does).
"""

from __future__ import annotations

import json
from pathlib import Path

from mhr.bundle_check import BundleError, check_task_name
from training.data import DataError, Example, read_jsonl


def read_data(path: str | Path, known_tasks=None, max_per_task: int | None = None) -> list[Example]:
    """Records from `path`: a JSONL file; a Super-NI task file (.json); a directory of task files; or a
    split file (.txt of task names, resolved against the `tasks/` directory of the benchmark checkout that
    holds it). `max_per_task` keeps the first N instances of each task (Super-NI tasks run to thousands)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("task*.json"))
        if not files:
            raise DataError(f"{path}: no Super-NI task files (task*.json) in this directory")
        examples = [ex for f in files for ex in read_superni(f, max_instances=max_per_task)]
    elif path.suffix == ".json":
        examples = read_superni(path, max_instances=max_per_task)
    elif path.suffix == ".txt":
        examples = [ex for f in split_files(path) for ex in read_superni(f, max_instances=max_per_task)]
    else:
        examples = _first_per_task(read_jsonl(path, known_tasks), max_per_task)
    if known_tasks is not None and (unknown := sorted({ex.task for ex in examples} - set(known_tasks))):
        raise DataError(f"{path}: unknown task(s) {unknown} (known: {', '.join(sorted(known_tasks))})")
    return examples


def _first_per_task(examples: list[Example], n: int | None) -> list[Example]:
    if n is None:
        return examples
    seen: dict[str, int] = {}
    kept = []
    for ex in examples:
        seen[ex.task] = seen.get(ex.task, 0) + 1
        if seen[ex.task] <= n:
            kept.append(ex)
    return kept


def split_files(split: Path) -> list[Path]:
    """The task files a split file names, found in the `tasks/` directory beside one of its parents."""
    try:
        names = [line.strip() for line in split.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{split}: cannot read the split file ({e})") from None
    if not names:
        raise DataError(f"{split}: the split names no task")
    tasks_dir = next((p / "tasks" for p in split.resolve().parents if (p / "tasks").is_dir()), None)
    if tasks_dir is None:
        raise DataError(f"{split}: no tasks/ directory beside any parent of the split file")
    missing = [n for n in names if not (tasks_dir / f"{n}.json").is_file()]
    if missing:
        raise DataError(f"{split}: task file(s) {missing[:5]} not found in {tasks_dir}")
    return [tasks_dir / f"{n}.json" for n in names]


def read_superni(path: str | Path, n_positive: int = 2, max_instances: int | None = None) -> list[Example]:
    """The instances of one Super-NI task file, prompted as "definition + `n_positive` examples".

    The task is named after the file; the target is an instance's first output and the other outputs
    are its references.
    """
    path = Path(path)
    try:
        check_task_name(path.stem, where=f"{path}: the file name")
    except BundleError as e:
        raise DataError(str(e)) from None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON task file ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a task file must hold a JSON object")
    prompt = _prompt_head(data, path, n_positive)
    examples = []
    for i, instance in enumerate(_field(data, "Instances", path)[:max_instances]):
        outputs = instance.get("output") if isinstance(instance, dict) else None
        text = instance.get("input") if isinstance(instance, dict) else None
        if not isinstance(text, str) or not isinstance(outputs, list) or not outputs \
                or not all(isinstance(o, str) and o.strip() for o in outputs):
            raise DataError(f"{path}: 'Instances'[{i}] needs a string 'input' and a non-empty list 'output' "
                            "of non-empty strings")
        examples.append(Example(path.stem, f"{prompt}Now complete the following example-\nInput: {text}\nOutput:",
                                outputs[0], references=tuple(outputs[1:]) or None))
    if not examples:
        raise DataError(f"{path}: 'Instances' is empty")
    return examples


def _prompt_head(data: dict, path: Path, n_positive: int) -> str:
    """The definition and the first `n_positive` positive examples, in the benchmark's template."""
    definition = _field(data, "Definition", path)
    definition = " ".join(definition) if isinstance(definition, list) else definition
    prompt = f"Definition: {definition}\n\n"
    for i, ex in enumerate(_field(data, "Positive Examples", path)[:n_positive], start=1):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("output"), str):
            raise DataError(f"{path}: 'Positive Examples'[{i - 1}] needs string 'input' and 'output'")
        prompt += f"Positive Example {i}-\nInput: {ex['input']}\nOutput: {ex['output']}\n\n"
    return prompt


def _field(data: dict, key: str, path: Path):
    if key not in data:
        raise DataError(f"{path}: missing field {key!r}")
    return data[key]
