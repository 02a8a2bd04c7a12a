"""Hostile archives sent to the admin upload routes over real loopback HTTP: limits count what is unpacked.

Every archive here is built by hand (tar headers byte by byte where tarfile will not write them: old-GNU
sparse members, base-256 and negative sizes) and must be answered quickly, without the server's memory
jumping (the server runs in this process, in a thread: its RSS is this process's, sampled while the
request runs), with nothing changed on disk and the server still serving. Valid archives that used to be
refused (gzip files of several members) are deployed and served.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import mhr
from mhr.export_peft import import_peft_files
from server.http.app import ADAPTER_HEADER
from server.http.uploads import MAX_GZIP_MEMBERS, MAX_MEMBERS, MAX_NAME
from tests.server import loopback as http
from tests.server.admin_helpers import (
    ADMIN,
    PROMPT,
    admin_app,
    archive,
    copy_bundle,
    directory_files,
    engine_on,
    snapshot,
)
from tests.server.conftest import ROUTED, random_lora
from tests.server.loopback import serve_app

LIMIT_MB = 2
LIMIT = LIMIT_MB * 2**20
GiB = 2**30
SECONDS = 2.0             # a refusal takes milliseconds; unpacking 2 GiB took seconds
RSS_GROWTH = 100 * 2**20  # unpacking 2 GiB grew the server's RSS by gigabytes
CONFIG, WEIGHTS = "adapter/adapter_config.json", "adapter/adapter_model.safetensors"


# ----- archives by hand -----------------------------------------------------------------------------

def number(value: int, width: int) -> bytes:
    """A tar number field: octal when it fits, else GNU base-256 (0x80 first, 0xff first when negative)."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    return (bytes([0x80]) + value.to_bytes(width - 1, "big") if value >= 0
            else bytes([0xFF]) + (256 ** (width - 1) + value).to_bytes(width - 1, "big"))


def gnu_header(name: str, size: int, kind: bytes = b"0", sparse: tuple = (), realsize: int = 0) -> bytes:
    """One old-GNU tar header block ("ustar  \\0" magic). For kind b"S" (GNUTYPE_SPARSE), `sparse` holds up
    to four (offset, length) data extents at bytes 386-481 and `realsize` (bytes 483-494) is the size the
    member expands to; `size` counts only the data stored in the archive."""
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108], h[108:116], h[116:124] = number(0o644, 8), number(0, 8), number(0, 8)
    h[124:136], h[136:148] = number(size, 12), number(0, 12)
    h[156:157] = kind
    h[257:265] = b"ustar  \0"
    for i, (offset, length) in enumerate(sparse):
        h[386 + 24 * i:398 + 24 * i], h[398 + 24 * i:410 + 24 * i] = number(offset, 12), number(length, 12)
    h[483:495] = number(realsize, 12)
    h[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def tar_blocks(*parts: bytes) -> bytes:
    """A tar of header and data blocks (data padded to 512), ended by two zero blocks."""
    return b"".join(p + bytes(-len(p) % 512) for p in parts) + bytes(1024)


def sparse_member(name: str = WEIGHTS, realsize: int = 2 * GiB) -> bytes:
    """An old-GNU sparse member storing 512 bytes at the end of a `realsize`-byte file of zeros."""
    return tar_blocks(gnu_header(name, 512, b"S", [(realsize - 512, 512)], realsize), b"x" * 512)


def pax_tar(pax_headers: dict[str, str], name: str = WEIGHTS, stored: int = 512) -> bytes:
    """A pax tar whose one member (`stored` bytes) carries `pax_headers` (tarfile writes them as given)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo(name)
        info.size, info.pax_headers = stored, pax_headers
        t.addfile(info, io.BytesIO(b"x" * stored))
    return buffer.getvalue()


def tar_of_names(names: list[str], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as t:
        for name in names:
            t.addfile(tarfile.TarInfo(name), io.BytesIO())
    return buffer.getvalue()


def zip_of(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buffer.getvalue()


def declaring(zip_bytes: bytes, size: int, where: tuple[bytes, ...] = (b"PK\x01\x02",)) -> bytes:
    """`zip_bytes` with every member's uncompressed size field rewritten to `size` in the central directory
    (and, with b"PK\\x03\\x04" in `where`, in the local headers): a header that lies."""
    data = bytearray(zip_bytes)
    for signature, field in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        if signature in where:
            at = data.find(signature)
            while at >= 0:
                data[at + field:at + field + 4] = size.to_bytes(4, "little")
                at = data.find(signature, at + 4)
    return bytes(data)


def gzip_members(data: bytes, size: int) -> bytes:
    """`data` compressed as consecutive gzip members of `size` input bytes each (what `cat a.gz b.gz`,
    bgzip or a split tar give)."""
    return b"".join(gzip.compress(data[i:i + size]) for i in range(0, len(data), size))


# ----- measuring ------------------------------------------------------------------------------------

def rss() -> int:
    """This process's resident set, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Sample the RSS every millisecond while the block runs; the yielded list then holds the peak's growth
    over the start, in bytes (a sampler, since a 2 GiB buffer freed at once leaves no trace in RSS after)."""
    start, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    growth: list[int] = []
    try:
        yield growth
    finally:
        done.set()
        sampler.join()
        growth.append(max(peak[0], rss()) - start)


# ----- the server -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft(bundle_path, tmp_path_factory, tiny_llama_path) -> dict[str, bytes]:
    """A valid PEFT LoRA directory for the test bundle: member name -> content."""
    bundle = mhr.Bundle.load(bundle_path)
    out = mhr.export_peft(random_lora(bundle, rank=4, seed=8), tmp_path_factory.mktemp("peft") / "p", "tiny")
    return directory_files(out)


@pytest.fixture(scope="module")
def refusing(bundle_path, tmp_path_factory, tiny_llama_path):
    """One server for the refusals (nothing they send may change anything): (url, bundle dir)."""
    directory = copy_bundle(bundle_path, tmp_path_factory.mktemp("uploads") / "bundle")
    engine = engine_on(tiny_llama_path, AutoTokenizer.from_pretrained(tiny_llama_path), directory)
    with serve_app(admin_app(engine, directory, max_upload_mb=LIMIT_MB)) as url:
        yield url, directory


def completion(url: str, task: str):
    return http.post(f"{url}/v1/completions", json={"model": task, "prompt": PROMPT, "max_tokens": 4,
                                                    "temperature": 0})


SPARSE = {
    "old-GNU sparse, 2 GiB": (sparse_member(), 413, "unpacks to more than"),
    "old-GNU sparse, 2 GiB, gzipped": (gzip.compress(sparse_member()), 413, "unpacks to more than"),
    "old-GNU sparse, base-256 realsize 2^87": (sparse_member(realsize=2**87), 413, "unpacks to more than"),
    "old-GNU sparse, under the limit": (sparse_member(realsize=4096), 400, "sparse file"),
    "pax sparse (GNU 0.1), 2 GiB": (pax_tar({"GNU.sparse.map": f"{2 * GiB - 512},512",
                                             "GNU.sparse.realsize": str(2 * GiB)}), 413, "unpacks to more than"),
    "pax sparse (GNU 0.0), 2 GiB": (pax_tar({"GNU.sparse.size": str(2 * GiB), "GNU.sparse.numblocks": "1",
                                             "GNU.sparse.offset": "0", "GNU.sparse.numbytes": "512"}),
                                    413, "unpacks to more than"),
    "base-256 size 2^80": (tar_blocks(gnu_header(WEIGHTS, 2**80), b"x" * 512), 413, "unpacks to more than"),
    "pax size 1 TiB": (pax_tar({"size": str(2**40)}), 413, "unpacks to more than"),
    "negative base-256 size": (tar_blocks(gnu_header(WEIGHTS, -1024), b"x" * 512), 400, "negative size"),
    "header declaring more than the archive holds": (tar_blocks(gnu_header(WEIGHTS, 100_000), b"x" * 512), 400,
                                                     "unreadable archive"),
}


@pytest.mark.parametrize("body, status, says", list(SPARSE.values()), ids=list(SPARSE))
def test_tar_sizes_are_counted_from_headers_before_anything_is_read(refusing, body, status, says):
    assert_refused(refusing, body, status, says)


def assert_refused(refusing, body: bytes, status: int, says: str, task: str = "hostile") -> None:
    url, directory = refusing
    before = snapshot(directory)
    with peak_rss_growth() as growth:
        start = time.monotonic()
        r = http.post(f"{url}/admin/tasks/{task}", content=body, headers=ADMIN)
        elapsed = time.monotonic() - start
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"], error
    assert status != 413 or error["code"] == "upload_too_large", error
    assert elapsed < SECONDS and growth[0] < RSS_GROWTH, (elapsed, growth[0] >> 20)
    assert snapshot(directory) == before
    r = completion(url, ROUTED[0])
    assert r.status_code == 200 and r.headers[ADAPTER_HEADER] == ROUTED[0], r.text


@pytest.fixture(scope="module")
def bounded(peft) -> dict[str, tuple[bytes, int, str]]:
    """Archives past the member, name and declared-size bounds: name -> (body, status, what the message says)."""
    deep = "a" * 200 + "/../../evil/adapter_config.json"
    long = "d/" * (MAX_NAME // 2) + "x"
    return {
        "1001 tar members": (tar_of_names([f"f{i}" for i in range(MAX_MEMBERS + 1)]), 413,
                             f"more than {MAX_MEMBERS} members"),
        "GNU long name past the bound": (tar_of_names([long]), 400, f"more than {MAX_NAME}"),
        "pax long name past the bound": (tar_of_names([long], tarfile.PAX_FORMAT), 400, f"more than {MAX_NAME}"),
        "GNU long name hiding '..'": (tar_of_names([deep]), 400, "'..' path"),
        "pax long name hiding '..'": (tar_of_names([deep], tarfile.PAX_FORMAT), 400, "'..' path"),
        "1001 zip members": (zip_of({f"f{i}": b"" for i in range(MAX_MEMBERS + 1)}), 413,
                             f"more than {MAX_MEMBERS} members"),
        "zip member declaring 4 GiB": (declaring(zip_of(peft), 2**32 - 2), 413, "unpacks to more than"),
        "zip member declaring less than it inflates to": (
            declaring(zip_of(peft), 10, (b"PK\x01\x02", b"PK\x03\x04")), 400, "unreadable archive"),
        "zip bomb, 256 MiB of zeros": (zip_of({WEIGHTS: bytes(256 * 2**20), CONFIG: peft[CONFIG]}), 413,
                                       "unpacks to more than"),
        "bzip2 zip member": (zip_of(peft, zipfile.ZIP_BZIP2), 400, "compression method 12"),
        "gzip bomb, 256 MiB of zeros": (gzip.compress(bytes(256 * 2**20)), 413, "unpacks to more than"),
        "10001 gzip members": (gzip.compress(b"") * (MAX_GZIP_MEMBERS + 1), 413,
                               f"more than {MAX_GZIP_MEMBERS} members"),
        "garbage after the gzip stream": (gzip.compress(archive(peft, "tar")) + b"garbage", 400,
                                          "not another gzip member"),
    }


BOUNDED = ["1001 tar members", "GNU long name past the bound", "pax long name past the bound",
           "GNU long name hiding '..'", "pax long name hiding '..'", "1001 zip members", "zip member declaring 4 GiB",
           "zip member declaring less than it inflates to", "zip bomb, 256 MiB of zeros", "bzip2 zip member",
           "gzip bomb, 256 MiB of zeros", "10001 gzip members", "garbage after the gzip stream"]


@pytest.mark.parametrize("case", BOUNDED)
def test_member_counts_names_and_declared_sizes_are_bounded(refusing, bounded, case):
    assert list(bounded) == BOUNDED
    assert_refused(refusing, *bounded[case])


@pytest.mark.parametrize("kind", ["split tar, 1 KiB gzip members", "cat of two gzip files", "zero padding"])
def test_a_gzip_file_of_several_members_is_deployed(kind, peft, bundle_path, tmp_path, tiny_llama_path,
                                                    tiny_tokenizer):
    tar = archive(peft, "tar")
    body = {"split tar, 1 KiB gzip members": gzip_members(tar, 1024),
            "cat of two gzip files": gzip_members(tar, len(tar) // 2 + 1),
            "zero padding": gzip.compress(tar) + bytes(4096)}[kind]
    directory = copy_bundle(bundle_path, tmp_path / "bundle")
    with serve_app(admin_app(engine_on(tiny_llama_path, tiny_tokenizer, directory), directory,
                             max_upload_mb=LIMIT_MB)) as url:
        r = http.post(f"{url}/admin/tasks/from-gzip", content=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        assert completion(url, "from-gzip").headers[ADAPTER_HEADER] == "from-gzip"
    assert mhr.Bundle.load(directory).adapters["from-gzip"].equal(import_peft_files(peft[CONFIG], peft[WEIGHTS]))
