"""mhr.files: atomic writes that leave the old file or the new one, and safetensors reads that never unpickle."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors

from mhr.files import FileFormatError, parse_safetensors, read_safetensors, safetensors_bytes, sha256, write_atomic


def test_write_atomic_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    write_atomic(target, b"first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.bin"]  # no temporary file left


@pytest.mark.parametrize("failing", ["os.replace", "os.fsync"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, failing):
    target = tmp_path / "file.bin"
    write_atomic(target, b"old")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(os, failing.split(".")[1], fail)
    with pytest.raises(OSError, match="simulated"):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_written_files_follow_the_umask_like_open_does(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "atomic.bin", b"x")
        (tmp_path / "plain.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "atomic.bin").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode) == 0o644


def test_sha256_is_the_hex_digest():
    assert sha256(b"mhr") == hashlib.sha256(b"mhr").hexdigest()


def test_safetensors_bytes_round_trip_views_and_dtypes():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.T, "s": base[:, 1], "h": base.to(torch.bfloat16)}  # non-contiguous views, bf16
    back = load_safetensors(safetensors_bytes(tensors))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


class PickleTrap:
    """Unpickling this runs os.mkdir(marker): proof that a loader unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("kind", ["torch-pickle", "garbage", "empty", "truncated"])
def test_parse_refuses_what_is_not_safetensors(tmp_path, kind):
    marker = tmp_path / "unpickled"
    if kind == "torch-pickle":
        buffer = io.BytesIO()
        torch.save({"w": torch.zeros(2), "trap": PickleTrap(marker)}, buffer)
        data = buffer.getvalue()
    else:
        data = {"garbage": b"\x00\x01 no header", "empty": b"",
                "truncated": safetensors_bytes({"w": torch.zeros(64)})[:-8]}[kind]
    where = tmp_path / "weights.safetensors"
    with pytest.raises(FileFormatError) as e:
        parse_safetensors(data, where)
    assert str(where) in str(e.value) and "not a valid safetensors file" in str(e.value)
    assert not marker.exists()


def test_read_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes({"w": torch.ones(2, 3)}))
    assert torch.equal(read_safetensors(path)["w"], torch.ones(2, 3))
    with pytest.raises(FileFormatError, match=f"{tmp_path / 'missing.safetensors'}: file not found"):
        read_safetensors(tmp_path / "missing.safetensors")
