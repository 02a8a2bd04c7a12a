"""Training data: reading task records, balanced per-task sampling, tokenization and collation.

Owns the record format (JSONL `{task, input, target}` with optional `choices` and `references`), the
per-task sampler and the encoding for causal and encoder-decoder
LMs (loss on target tokens only). Leaves Super-NaturalInstructions files to `training.superni`, the task suite
to `training.suite` and the loss to `training.loop`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from mhr.bundle_check import BundleError, check_task_name

IGNORE = -100  # label of tokens that carry no loss (prompt, padding), as torch's cross_entropy expects


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class Example:
    """One text-to-text instance. With `choices`, `target` is the right one (rank classification).
    `references` are further right answers (Super-NI instances have several): metrics take the best match
    over the target and them; training uses the target."""

    task: str
    input: str
    target: str
    choices: tuple[str, ...] | None = None
    references: tuple[str, ...] | None = None

    def to_json(self) -> str:
        record = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if v is not None}
        return json.dumps(record, ensure_ascii=False)

    @property
    def answers(self) -> tuple[str, ...]:
        """Every right answer: the target, then the references."""
        return (self.target, *(self.references or ()))


# ----- reading ------------------------------------------------------------------------------------

def read_jsonl(path: str | Path, known_tasks: Collection[str] | None = None) -> list[Example]:
    """Every record of a JSONL file; `known_tasks` (when given) is the set of task names allowed.

    Raises DataError "<file>:<line>: <problem>" for the first bad record, and for a file without records.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            examples.append(parse_record(line, known_tasks))
        except ValueError as e:
            raise DataError(f"{path}:{number}: {e}") from None
    if not examples:
        raise DataError(f"{path}: no records")
    return examples


def parse_record(line: str, known_tasks: Collection[str] | None = None) -> Example:
    """One JSONL line -> Example; ValueError says what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, found {type(record).__name__}")
    for field in ("task", "input", "target"):
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"field {field!r} must be a non-empty string, found {value!r}")
    unknown = sorted(set(record) - {"task", "input", "target", "choices", "references"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    try:
        check_task_name(record["task"], where="field 'task'")
    except BundleError as e:
        raise ValueError(str(e)) from None
    if known_tasks is not None and record["task"] not in known_tasks:
        raise ValueError(f"unknown task {record['task']!r} (known: {', '.join(sorted(known_tasks))})")
    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError(f"field 'choices' must be a list of at least 2 non-empty strings, found {choices!r}")
        if record["target"] not in choices:
            raise ValueError(f"field 'target' {record['target']!r} is not one of the choices")
        choices = tuple(choices)
    references = record.get("references")
    if references is not None:
        if not isinstance(references, list) or not all(isinstance(r, str) and r.strip() for r in references):
            raise ValueError(f"field 'references' must be a list of non-empty strings, found {references!r}")
        references = tuple(references)
    return Example(record["task"], record["input"], record["target"], choices, references)


def write_jsonl(path: str | Path, examples: Sequence[Example]) -> None:
    Path(path).write_text("".join(e.to_json() + "\n" for e in examples), encoding="utf-8")


# ----- sampling -----------------------------------------------------------------------------------

class TaskSampler:
    """Balanced multi-task sampling as a pure function of the position in the example stream.

    The stream visits tasks in cycles: each cycle is a fresh seeded permutation of all tasks, so every
    task is seen once per `n_tasks` examples whatever the sizes of the tasks. Within a task, examples are
    drawn without replacement, reshuffled every pass. Because example n depends only on (seed, n),
    resuming or splitting the stream across processes needs no sampler state.
    """

    def __init__(self, examples: Sequence[Example], seed: int) -> None:
        self.tasks = task_names(examples)
        index = {t: i for i, t in enumerate(self.tasks)}
        self.by_task: list[list[int]] = [[] for _ in self.tasks]
        for i, ex in enumerate(examples):
            self.by_task[index[ex.task]].append(i)
        self.seed = seed
        self._perms: dict[tuple, list[int]] = {}

    def _perm(self, *key: int) -> list[int]:
        """A seeded permutation of tasks (key (cycle,)) or of one task's examples (key (task, pass))."""
        if key not in self._perms:
            if len(self._perms) > 4096:  # a long run moves on through cycles: old ones are never asked again
                self._perms.clear()
            n = len(self.tasks) if len(key) == 1 else len(self.by_task[key[0]])
            order = list(range(n))
            random.Random(f"{self.seed}/{'/'.join(map(str, key))}").shuffle(order)  # str seeds are stable
            self._perms[key] = order
        return self._perms[key]

    def __getitem__(self, n: int) -> int:
        """The index (into the examples given) of example n of the stream."""
        n_tasks = len(self.tasks)
        cycle, slot = divmod(n, n_tasks)
        task = self._perm(cycle)[slot]
        ids = self.by_task[task]
        epoch, k = divmod(cycle, len(ids))  # this is the task's cycle-th visit
        return ids[self._perm(task, epoch)[k]]

    def batch(self, step: int, batch_size: int) -> list[int]:
        """Indices of the examples of batch `step` (examples step*batch_size ... +batch_size)."""
        return [self[step * batch_size + i] for i in range(batch_size)]


# ----- tokenization -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoded:
    """Model inputs and, for every output position of the model, the token it must predict.

    Causal LM: labels[i] is input_ids[i + 1] where that is a target token, else IGNORE (prompt, last).
    Encoder-decoder: input_ids feed the encoder; labels are the decoder's tokens (target + EOS).
    """

    input_ids: list[int]
    labels: list[int]
    task_id: int


def encode(tokenizer, example: Example, task_id: int, max_length: int, encoder_decoder: bool = False) -> Encoded:
    """Prompt and " " + target + EOS, with labels on the target and EOS only.

    The prompt and target are tokenized apart so the boundary is exact; when too long the prompt loses
    tokens from the left (its end, next to the answer, matters most), then the target from the right.
    """
    prompt = tokenizer(example.input)["input_ids"]
    target = tokenizer(" " + example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if encoder_decoder:
        return Encoded(prompt[-max_length:], target[:max_length], task_id)
    target = target[:max_length - 1]
    prompt = prompt[max(0, len(prompt) + len(target) - max_length):]
    return Encoded(prompt + target, [IGNORE] * (len(prompt) - 1) + target + [IGNORE], task_id)


def n_targets(batch: dict[str, Tensor]) -> int:
    """The number of target tokens (labels that carry loss) in a collated batch."""
    return int((batch["labels"] != IGNORE).sum())


def encode_all(tokenizer, examples: Sequence[Example], tasks: Sequence[str], max_length: int,
               encoder_decoder: bool = False) -> list[Encoded]:
    """`encode` every example; task ids index `tasks` (the routing rows), which must hold every task."""
    index = {t: i for i, t in enumerate(tasks)}
    missing = sorted({ex.task for ex in examples} - set(index))
    if missing:
        raise DataError(f"task(s) {missing} are not among the model's tasks ({', '.join(tasks)})")
    return [encode(tokenizer, ex, index[ex.task], max_length, encoder_decoder) for ex in examples]


def padding_id(tokenizer) -> int:
    """The padding token; many causal LMs have none, and then EOS pads (padding is masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tensors: input_ids, attention_mask [B, L], labels [B, L'] (L' = L for causal LMs) and
    task_ids [B]."""
    inputs = max(len(e.input_ids) for e in batch)
    labels = max(len(e.labels) for e in batch)

    def padded(values: list[int], fill: int, length: int) -> list[int]:
        return values + [fill] * (length - len(values))

    return {
        "input_ids": torch.tensor([padded(e.input_ids, pad_id, inputs) for e in batch]),
        "attention_mask": torch.tensor([padded([1] * len(e.input_ids), 0, inputs) for e in batch]),
        "labels": torch.tensor([padded(e.labels, IGNORE, labels) for e in batch]),
        "task_ids": torch.tensor([e.task_id for e in batch]),
    }


def task_names(examples: Sequence[Example]) -> list[str]:
    """The tasks of `examples`, sorted (the routing table order of a fresh training run)."""
    return sorted({ex.task for ex in examples})


class TaskBatches:
    """The tokenized, balanced multi-task stream, cut into collated micro-batches by index.

    `tasks` names the routing rows (task id i is tasks[i]); the examples may cover only some of them.
    With several data-parallel processes, global micro-batch n holds `batch_size * n_ranks` examples and
    process `rank` gets its slice, so the processes together see what one process with the whole batch sees.
    """

    def __init__(self, tokenizer, examples: Sequence[Example], tasks: Sequence[str], batch_size: int,
                 max_length: int, seed: int, rank: int = 0, n_ranks: int = 1, encoder_decoder: bool = False) -> None:
        self.tasks = list(tasks)
        self.encoded = encode_all(tokenizer, examples, self.tasks, max_length, encoder_decoder)
        self.sampler = TaskSampler(examples, seed)
        self.batch_size = batch_size
        self.rank, self.n_ranks = rank, n_ranks
        self.pad_id = padding_id(tokenizer)

    def __getitem__(self, n: int) -> dict[str, Tensor]:
        """This process's part of micro-batch n (examples of the stream, batch_size of them)."""
        indices = self.sampler.batch(n * self.n_ranks + self.rank, self.batch_size)
        return collate([self.encoded[i] for i in indices], self.pad_id)
