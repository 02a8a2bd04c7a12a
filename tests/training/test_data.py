"""Reading records and task files, balanced sampling, encoding with target-only labels, collation."""

import json
from collections import Counter
from pathlib import Path

import pytest

from training.data import IGNORE, DataError, Example, TaskSampler, collate, encode, read_jsonl
from training.superni import read_data, read_superni

SUPERNI = Path(__file__).parent / "fixtures" / "superni"  # laid out as allenai/natural-instructions
FIXTURE = SUPERNI / "tasks" / "task001_toy_antonyms.json"
GOOD = {"task": "t1", "input": "say hi", "target": "hi"}


def write_lines(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_records_with_and_without_choices(tmp_path):
    ranked = {"task": "t2", "input": "yes or no?", "target": "yes", "choices": ["yes", "no"]}
    path = write_lines(tmp_path, [json.dumps(GOOD), "", json.dumps(ranked)])
    assert read_jsonl(path) == [Example("t1", "say hi", "hi"), Example("t2", "yes or no?", "yes", ("yes", "no"))]


@pytest.mark.parametrize("bad, message", [
    ('{"task": "t1", "input": "x"', "invalid JSON"),
    ('["t1", "x", "y"]', "must be a JSON object"),
    ('{"task": "t1", "input": "x"}', "field 'target'"),
    ('{"task": "t1", "input": "x", "target": "  "}', "field 'target'"),
    ('{"task": "t1", "input": 3, "target": "y"}', "field 'input'"),
    ('{"task": "t/1", "input": "x", "target": "y"}', "invalid task name"),
    ('{"task": "t1", "input": "x", "target": "y", "extra": 1}', "unknown field"),
    ('{"task": "t1", "input": "x", "target": "y", "choices": ["a", "b"]}', "not one of the choices"),
    ('{"task": "t1", "input": "x", "target": "y", "choices": ["y"]}', "at least 2"),
])
def test_bad_record_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path, [json.dumps(GOOD), bad])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: ")
    assert message in str(e.value)


def test_unknown_task_is_refused_when_tasks_are_given(tmp_path):
    path = write_lines(tmp_path, [json.dumps(GOOD), json.dumps({**GOOD, "task": "other"})])
    assert len(read_jsonl(path)) == 2
    with pytest.raises(DataError, match=rf"{path}:2: unknown task 'other'"):
        read_jsonl(path, known_tasks={"t1"})


def test_empty_and_missing_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="no records"):
        read_jsonl(write_lines(tmp_path, [""]))
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_superni_task_file():
    examples = read_superni(FIXTURE, n_positive=2)
    assert [ex.target for ex in examples] == ["dark", "late", "closed"]  # the first output of each instance
    assert [ex.references for ex in examples] == [("heavy",), None, ("shut",)]  # the others are references
    assert examples[0].answers == ("dark", "heavy")
    assert {ex.task for ex in examples} == {"task001_toy_antonyms"}
    prompt = examples[1].input
    assert prompt.startswith("Definition: Given a word, write its antonym.")
    assert "Input: hot\nOutput: cold" in prompt and "Input: up\nOutput: down" in prompt
    assert "big" not in prompt  # only two positive examples
    assert "quick" not in prompt  # negative examples are not shown
    assert prompt.endswith("Input: early\nOutput:")


def test_read_data_by_path(tmp_path):
    """A task file, a directory of them, a split file (resolved against the checkout's tasks/), JSONL."""
    split = read_data(SUPERNI / "splits" / "default" / "test_tasks.txt")
    assert {ex.task for ex in split} == {"task002_toy_plurals"} and len(split) == 4
    assert split[0].answers == ("fish", "fishes")
    assert len(read_data(SUPERNI / "tasks")) == 7
    assert [ex.target for ex in read_data(FIXTURE, max_per_task=2)] == ["dark", "late"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(ex.to_json() + "\n" for ex in split))  # references survive JSONL
    assert read_data(jsonl, max_per_task=3) == split[:3]
    with pytest.raises(DataError, match="unknown task"):
        read_data(FIXTURE, known_tasks={"other"})
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "x.txt").write_text("task009_absent\n")
    with pytest.raises(DataError, match="no tasks/ directory"):
        read_data(tmp_path / "splits" / "x.txt")
    (tmp_path / "tasks").mkdir()
    with pytest.raises(DataError, match="task009_absent"):
        read_data(tmp_path / "splits" / "x.txt")
    with pytest.raises(DataError, match="no Super-NI task files"):
        read_data(tmp_path / "tasks")


def test_superni_bad_file(tmp_path):
    data = json.loads(FIXTURE.read_text())
    data["Instances"][1]["output"] = []
    path = tmp_path / "task002_broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"task002_broken.json: 'Instances'\[1\]"):
        read_superni(path)
    del data["Definition"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="missing field 'Definition'"):
        read_superni(path)


def examples_of(sizes):
    return [Example(task, f"{task} {i}", "x") for task, n in sizes.items() for i in range(n)]


def test_sampler_sees_every_task_once_per_cycle_whatever_its_size():
    examples = examples_of({"a": 1, "b": 7, "c": 3})
    sampler = TaskSampler(examples, seed=0)
    drawn = [examples[sampler[n]].task for n in range(30)]
    for cycle in range(10):
        assert sorted(drawn[3 * cycle: 3 * cycle + 3]) == ["a", "b", "c"]


def test_sampler_draws_a_task_without_replacement_and_is_seeded():
    examples = examples_of({"a": 2, "b": 5})
    sampler = TaskSampler(examples, seed=1)
    b_draws = [sampler[n] for n in range(20) if examples[sampler[n]].task == "b"]
    assert sorted(b_draws[:5]) == sorted(b_draws[5:10]) == list(range(2, 7))  # each pass: every example once
    assert Counter(b_draws) == {i: 2 for i in range(2, 7)}
    assert [TaskSampler(examples, seed=1)[n] for n in range(20)] == [sampler[n] for n in range(20)]
    assert [TaskSampler(examples, seed=2)[n] for n in range(20)] != [sampler[n] for n in range(20)]


def test_encode_puts_labels_on_target_and_eos_only(tiny_tokenizer):
    ex = Example("t", "reverse then upper: kalo", "OLAK")
    enc = encode(tiny_tokenizer, ex, task_id=3, max_length=64)
    prompt = tiny_tokenizer(ex.input)["input_ids"]
    target = enc.input_ids[len(prompt):]
    assert enc.input_ids[:len(prompt)] == prompt
    assert target[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(target[:-1]) == " OLAK"
    # output i predicts token i + 1: the last prompt position predicts the first target token
    assert enc.labels == [IGNORE] * (len(prompt) - 1) + target + [IGNORE]
    assert enc.task_id == 3


def test_encode_for_an_encoder_decoder(tiny_tokenizer):
    ex = Example("t", "reverse then upper: kalo", "OLAK")
    enc = encode(tiny_tokenizer, ex, task_id=0, max_length=64, encoder_decoder=True)
    assert enc.input_ids == tiny_tokenizer(ex.input)["input_ids"]
    assert enc.labels[-1] == tiny_tokenizer.eos_token_id and tiny_tokenizer.decode(enc.labels[:-1]) == " OLAK"
    short = encode(tiny_tokenizer, ex, task_id=0, max_length=3, encoder_decoder=True)
    assert short.input_ids == enc.input_ids[-3:] and short.labels == enc.labels[:3]


def test_encode_truncates_the_prompt_from_the_left(tiny_tokenizer):
    ex = Example("t", "word " * 40 + "end", "answer")
    enc = encode(tiny_tokenizer, ex, task_id=0, max_length=12)
    assert len(enc.input_ids) == len(enc.labels) == 12
    n_target = sum(label != IGNORE for label in enc.labels)
    assert tiny_tokenizer.decode(enc.input_ids[-n_target:-1]) == " answer"
    assert tiny_tokenizer.decode(enc.input_ids[:-n_target]).endswith("end")


def test_collate_pads_right_and_masks(tiny_tokenizer):
    short = encode(tiny_tokenizer, Example("t", "a", "b"), 0, 64)
    long = encode(tiny_tokenizer, Example("t", "a longer prompt", "and target"), 2, 64)
    batch = collate([short, long], pad_id=tiny_tokenizer.pad_token_id)
    n = len(short.input_ids)
    shape = (2, len(long.input_ids))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == shape
    assert batch["input_ids"][0, n:].eq(tiny_tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert batch["labels"][0, n:].eq(IGNORE).all() and batch["labels"][0, :n].tolist() == short.labels
    assert batch["attention_mask"][1].all() and batch["task_ids"].tolist() == [0, 2]


def test_collate_pads_labels_to_their_own_length(tiny_tokenizer):
    a = encode(tiny_tokenizer, Example("t", "a long prompt here", "b"), 0, 64, encoder_decoder=True)
    b = encode(tiny_tokenizer, Example("t", "a", "a longer target"), 1, 64, encoder_decoder=True)
    batch = collate([a, b], pad_id=tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(a.input_ids))
    assert batch["labels"].shape == (2, len(b.labels))
    assert batch["labels"][0].tolist() == a.labels + [IGNORE] * (len(b.labels) - len(a.labels))
