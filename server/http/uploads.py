"""Admin uploads: what a task upload holds (routing logits or a LoRA), parsed from untrusted bytes.

Formats (the request body):
  * safetensors with one tensor per module named `<module>`, logits [h, K]: a routed task;
  * safetensors with `<module>.lora_A` [d_in, r] / `<module>.lora_B` [r, d_out]: a dense task
    (`alpha` given separately, default r; finite, > 0, alpha / r at most `mhr.adapter.MAX_SCALING`);
  * a .tar, .tar.gz or .zip of a PEFT LoRA directory (adapter_config.json, adapter_model.safetensors).

Archives are never extracted: only the two PEFT files are read, by name, into memory. Members with
absolute or `..` paths are refused. What an archive unpacks to is bounded by the caller's byte limit
(413 `upload_too_large`, like an oversized body) before it is unpacked: gzip is inflated in bounded
steps (every member of a multi-member file), and each tar or zip member's declared size (for a sparse
tar member, its expanded size) is added up before any member is read, and then read no further than
declared. An archive may hold at most MAX_MEMBERS members (413) with names of at most MAX_NAME
characters (400); sparse tar members and zip compression other than deflate or store are refused (400).
Shapes and values are checked against the bundle later, by `mhr.Bundle` (which knows the modules); here
only the format is.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from torch import Tensor

import mhr
from mhr.adapter import scale_problem
from mhr.export_peft import CONFIG_FILE, WEIGHTS_FILE, import_peft_files
from mhr.files import FileFormatError, parse_safetensors
from server.http.errors import APIError

PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
MAX_MEMBERS = 1000        # a PEFT directory holds a handful of files; the bound keeps header parsing cheap
MAX_NAME = 4096           # PATH_MAX: a longer name (GNU long-name or pax record) is no file of a directory
MAX_GZIP_MEMBERS = 10000  # bgzip writes one per 64 KiB: 640 MiB of tar, above any upload limit we expect
MAX_ZIP_DIRECTORY = 4 * 2**20  # zipfile parses the whole central directory up front (~46 bytes a member)
GZIP_STEP = 64 * 2**10    # compressed bytes inflated per step: a bounded copy per gzip member
GZIP_MAGIC = b"\x1f\x8b"
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}  # bzip2/lzma: unbounded steps
# What a malformed archive makes tarfile or zipfile raise (IndexError, ValueError: headers that end early
# or hold garbage numbers); answered 400.
UNREADABLE = (tarfile.TarError, zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError,
              NotImplementedError, ValueError, IndexError, OverflowError, struct.error)


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
    A, B = {n: tensors[f"{n}.lora_A"] for n in names}, {n: tensors[f"{n}.lora_B"] for n in names}
    try:
        lora = mhr.LoRA(A, B, alpha=1.0)
    except ValueError as e:
        raise APIError(400, f"upload: {e}", param="body") from None
    if alpha is None:
        return mhr.LoRA(A, B, alpha=float(lora.rank))
    problem = scale_problem(alpha, lora.rank)
    if problem:
        raise APIError(400, f"alpha {problem}", param="alpha")
    return mhr.LoRA(A, B, alpha=float(alpha))


def is_archive(body: bytes) -> bool:
    return body[:2] == GZIP_MAGIC or body[:4] == b"PK\x03\x04" or body[257:262] == b"ustar"


def peft_archive(body: bytes, limit: int) -> mhr.LoRA:
    """Import a PEFT LoRA directory from an archive, reading only its two files (nothing touches the disk)."""
    try:
        files = _zip_files(body, limit) if body[:4] == b"PK\x03\x04" else _tar_files(body, limit)
    except UNREADABLE as e:
        raise APIError(400, f"upload: unreadable archive ({type(e).__name__}: {e})", param="body") from None
    missing = [f for f in PEFT_FILES if f not in files]
    if missing:
        raise APIError(400, f"upload: the archive lacks {missing}: archive a PEFT LoRA directory", param="body")
    try:
        return import_peft_files(files[CONFIG_FILE], files[WEIGHTS_FILE])
    except mhr.PeftFormatError as e:
        raise APIError(400, f"upload: {e}", param="body") from None


class _Budget:
    """What an archive may still unpack to: every member is admitted here, on its header alone, before
    any member's content is read."""

    def __init__(self, limit: int) -> None:
        self.limit, self.left, self.members = limit, limit, 0

    def admit(self, name: str, size: int) -> None:
        """Count a member named `name` declaring `size` bytes; 413 past the limits, 400 for a bad header."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise _too_large(f"upload: the archive holds more than {MAX_MEMBERS} members")
        if len(name) > MAX_NAME:
            raise APIError(400, f"upload: archive member {name[:100]!r}… has a name of {len(name)} characters, "
                                f"more than {MAX_NAME}", param="body")
        if size < 0:
            raise APIError(400, f"upload: archive member {name[:100]!r} declares a negative size", param="body")
        if size > self.left:
            raise _too_large(f"upload: the archive unpacks to more than {self.limit} bytes")
        self.left -= size


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


def _read_declared(f: BinaryIO, size: int, name: str) -> bytes:
    """A member's content: `size` bytes (as its header declared and the budget admitted), never more."""
    data = f.read(size + 1)
    if len(data) != size:
        raise APIError(400, f"upload: archive member {name[:100]!r} holds {'more' if len(data) > size else 'less'} "
                            f"than the {size} bytes its header declares", param="body")
    return data


def _zip_files(body: bytes, limit: int) -> dict[str, bytes]:
    _check_zip_directory(body)
    files: dict[str, bytes] = {}
    budget = _Budget(limit)
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        for info in z.infolist():
            budget.admit(info.filename, info.file_size)
            name = _peft_name(info.filename, files)
            if name is None or info.is_dir():
                continue
            if info.compress_type not in ZIP_METHODS:
                raise APIError(400, f"upload: zip member {info.filename[:100]!r} uses compression method "
                                    f"{info.compress_type}: zip with deflate (the default) or store", param="body")
            with z.open(info) as f:
                files[name] = _read_declared(f, info.file_size, info.filename)
    return files


def _check_zip_directory(body: bytes) -> None:
    """Bound the member count and the central directory a zip declares, before zipfile parses all of it.

    Read with zipfile's own end-of-directory reader, so the numbers checked are the ones zipfile uses.
    """
    end = zipfile._EndRecData(io.BytesIO(body))
    if end is None:
        return  # not a zip: zipfile refuses it (400)
    if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_MEMBERS:
        raise _too_large(f"upload: the archive holds more than {MAX_MEMBERS} members")
    if end[zipfile._ECD_SIZE] > MAX_ZIP_DIRECTORY:
        raise _too_large(f"upload: the zip's central directory is larger than {MAX_ZIP_DIRECTORY} bytes")


def _tar_files(body: bytes, limit: int) -> dict[str, bytes]:
    # inflated here, bounded: tarfile would inflate a bomb while scanning headers
    data = _gunzip(body, limit) if body[:2] == GZIP_MAGIC else io.BytesIO(body)
    files: dict[str, bytes] = {}
    budget = _Budget(limit)
    with tarfile.open(fileobj=data, mode="r:") as t:
        for member in t:  # each header is checked before the next is parsed and before any content is read
            budget.admit(member.name, member.size)  # a sparse member's size is what it expands to
            if member.issparse():
                raise APIError(400, f"upload: archive member {member.name[:100]!r} is a sparse file: archive "
                                    "regular files", param="body")
            name = _peft_name(member.name, files)
            if name is None or not member.isfile():  # links and devices are never followed
                continue
            files[name] = _read_declared(t.extractfile(member), member.size, member.name)
    return files


def _gunzip(data: bytes, limit: int) -> io.BytesIO:
    """Every member of a gzip file (several when files were concatenated, as `cat a.gz b.gz` or some
    compressors make) inflated into at most `limit` bytes (413 past it). Zero padding after the last
    member is ignored, as gzip does; anything else after it is refused."""
    out, view, pos = io.BytesIO(), memoryview(data), 0
    for _ in range(MAX_GZIP_MEMBERS):
        pos = _inflate_member(view, pos, out, limit)
        if data[pos:pos + 2] != GZIP_MAGIC:
            break
    else:
        raise _too_large(f"upload: the gzip file holds more than {MAX_GZIP_MEMBERS} members")
    if data.count(0, pos) != len(data) - pos:
        raise APIError(400, "upload: data after the gzip stream is not another gzip member", param="body")
    out.seek(0)
    return out


def _inflate_member(view: memoryview, pos: int, out: io.BytesIO, limit: int) -> int:
    """Inflate the gzip member starting at `view[pos]` onto `out`, in bounded steps; returns where it ends."""
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    while not inflate.eof:
        step = view[pos:pos + GZIP_STEP]
        if not step:
            raise APIError(400, "upload: the gzip stream is truncated", param="body")
        # max_length stops inflating one byte past the limit: a bomb costs at most `limit` bytes
        out.write(inflate.decompress(step, limit + 1 - out.tell()))
        if out.tell() > limit:
            raise _too_large(f"upload: the archive unpacks to more than {limit} bytes")
        pos += len(step) - len(inflate.unused_data)
    return pos


def _too_large(message: str) -> APIError:
    return APIError(413, message, param="body", code="upload_too_large")
