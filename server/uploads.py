"""Admin uploads: what a task upload holds (routing logits or a LoRA), parsed from untrusted bytes.

Formats (the request body):
  * safetensors with one tensor per module named `<module>`, logits [h, K]: a routed task;
  * safetensors with `<module>.lora_A` [d_in, r] / `<module>.lora_B` [r, d_out]: a dense task
    (`alpha` given separately, default r);
  * a .tar, .tar.gz or .zip of a PEFT LoRA directory (adapter_config.json, adapter_model.safetensors).

Archives are never extracted: only the two PEFT files are read, by name, into memory. Members with
absolute or `..` paths are refused, and so is unpacking more than the caller's byte limit (an archive
bomb), which answers 413 like an oversized body. Shapes and values are checked against the bundle later,
by `mhr.Bundle` (which knows the modules); here only the format is.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from torch import Tensor

import mhr
from mhr.export_peft import CONFIG_FILE, WEIGHTS_FILE
from mhr.files import FileFormatError, parse_safetensors
from server.serving import APIError

PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE)


@dataclass
class Upload:
    """A parsed upload: routing logits per module, or a LoRA (exactly one)."""

    logits: dict[str, Tensor] | None = None
    lora: mhr.LoRA | None = None


def parse_upload(body: bytes, content_type: str, alpha: float | None, limit: int) -> Upload:
    """Routing logits or a LoRA from an upload (see the module docstring); `limit` caps unpacked bytes."""
    if is_archive(body):
        if alpha is not None:
            raise APIError(400, "alpha applies to safetensors LoRA uploads; a PEFT archive carries its own "
                                "lora_alpha", param="alpha")
        return Upload(lora=peft_archive(body, limit))
    try:
        tensors = parse_safetensors(body, Path("upload"))
    except FileFormatError as e:
        raise APIError(400, f"{e}: send a safetensors file, or a .tar/.tar.gz/.zip of a PEFT LoRA directory "
                            f"(content type was {content_type or 'not set'})", param="body") from None
    if not tensors:
        raise APIError(400, "upload: the safetensors file holds no tensors", param="body")
    if all(k.endswith((".lora_A", ".lora_B")) for k in tensors):
        return Upload(lora=_dense(tensors, alpha))
    if alpha is not None:
        raise APIError(400, "alpha applies to dense LoRA uploads only, not routing logits", param="alpha")
    return Upload(logits=tensors)


def _dense(tensors: dict[str, Tensor], alpha: float | None) -> mhr.LoRA:
    names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    missing = [f"{n}.lora_{ab}" for n in names for ab in "AB" if f"{n}.lora_{ab}" not in tensors]
    if missing:
        raise APIError(400, f"upload: missing tensors {missing[:4]}", param="body")
    if any(t.dim() != 2 for t in tensors.values()):
        raise APIError(400, "upload: LoRA tensors must be 2-D: lora_A [d_in, r], lora_B [r, d_out]", param="body")
    if alpha is not None and not alpha > 0:
        raise APIError(400, f"alpha must be > 0, got {alpha}", param="alpha")
    A, B = {n: tensors[f"{n}.lora_A"] for n in names}, {n: tensors[f"{n}.lora_B"] for n in names}
    try:
        rank = mhr.LoRA(A, B, alpha=1.0).rank
    except ValueError as e:
        raise APIError(400, f"upload: {e}", param="body") from None
    return mhr.LoRA(A, B, alpha=float(alpha if alpha is not None else rank))


def is_archive(body: bytes) -> bool:
    return body[:2] == b"\x1f\x8b" or body[:4] == b"PK\x03\x04" or body[257:262] == b"ustar"


def peft_archive(body: bytes, limit: int) -> mhr.LoRA:
    """Import a PEFT LoRA directory from an archive, reading only its two files (no paths are extracted)."""
    try:
        files = _zip_files(body, limit) if body[:4] == b"PK\x03\x04" else _tar_files(body, limit)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError,
            NotImplementedError) as e:
        raise APIError(400, f"upload: unreadable archive ({e})", param="body") from None
    missing = [f for f in PEFT_FILES if f not in files]
    if missing:
        raise APIError(400, f"upload: the archive lacks {missing}: archive a PEFT LoRA directory", param="body")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return mhr.import_peft(tmp)
        except mhr.PeftFormatError as e:
            raise APIError(400, f"upload: {e}".replace(tmp + "/", ""), param="body") from None


def _peft_name(name: str, files: dict[str, bytes]) -> str | None:
    """The PEFT file a member holds (None: not one we read), refusing unsafe or ambiguous names."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise APIError(400, f"upload: archive member {name[:100]!r} has an absolute or '..' path: archive the "
                            "adapter directory with relative paths", param="body")
    if path.name not in PEFT_FILES:
        return None
    if path.name in files:
        raise APIError(400, f"upload: the archive holds more than one {path.name}: archive one adapter "
                            "directory", param="body")
    return path.name


def _zip_files(body: bytes, limit: int) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        for info in z.infolist():
            name = _peft_name(info.filename, files)
            if name is None or info.is_dir():
                continue
            with z.open(info) as f:  # reads stop at the declared size; the cap guards a lying header too
                files[name] = f.read(limit + 1)
            _check_unpacked(sum(map(len, files.values())), limit)
    return files


def _tar_files(body: bytes, limit: int) -> dict[str, bytes]:
    if body[:2] == b"\x1f\x8b":
        body = _gunzip(body, limit)  # bounded here: tarfile would inflate a bomb while scanning headers
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as t:
        for member in t:
            name = _peft_name(member.name, files)
            if name is None or not member.isfile():  # links and devices are never followed
                continue
            files[name] = t.extractfile(member).read()
    return files


def _gunzip(data: bytes, limit: int) -> bytes:
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = inflate.decompress(data, limit + 1)
    _check_unpacked(len(out), limit)
    if not inflate.eof:
        raise APIError(400, "upload: the gzip stream is truncated", param="body")
    return out


def _check_unpacked(size: int, limit: int) -> None:
    if size > limit:
        raise APIError(413, f"upload: the archive unpacks to more than {limit} bytes", param="body",
                       code="upload_too_large")
