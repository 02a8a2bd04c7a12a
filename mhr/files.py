"""Atomic file writes and pickle-free safetensors reads, with errors that name the file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes


class FileFormatError(ValueError):
    """A file that cannot be read as what it claims to be; the message names the file."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize tensors (any device, any layout) to safetensors bytes."""
    return save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def parse_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes read from `path`; never unpickles."""
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{path}: not a valid safetensors file ({e})") from e


def read_json_object(path: Path, what: str, **hooks) -> dict:
    """The JSON object in `path`; FileFormatError names the file when it is missing or not an object.

    `what` says what the file should belong to, for the not-found message (e.g. "a bundle directory");
    `hooks` go to `json.loads` (parse_float, parse_constant).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found: is this {what}?") from None
    return parse_json_object(data, path, **hooks)


def parse_json_object(data: bytes, path: Path, **hooks) -> dict:
    """The JSON object in `data`, read from `path` (named in the FileFormatError when it is not one);
    `hooks` go to `json.loads`."""
    try:
        value = json.loads(data, **hooks)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise FileFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: must hold a JSON object")
    return value


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with a clear error when it is missing or malformed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise FileFormatError(f"{path}: file not found") from e
    return parse_safetensors(data, path)
