"""Fixtures of the security tests: the tiny model and bundle of the server tests, served over real loopback,
in this process (`tests.server.loopback.serve_app`) or as the real `python -m server` process, whose memory and
event loop are its own."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import processes
from tests.server.admin_helpers import ADMIN_KEY, API_KEY, copy_bundle
from tests.server.conftest import bundle_path, make_engine  # noqa: F401  (fixtures reused as they are)

KEY = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base: str
    log: Path

    def rss_mb(self) -> float:
        """The server process's resident memory, MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@contextmanager
def server_process(model: Path, bundle: Path, log: Path, *args: str) -> Iterator[ServerProcess]:
    """`python -m server` with an API key and an admin key on a free port, ready; stopped afterwards."""
    with processes.server_process(["--bundle", str(bundle), "--model", str(model), "--api-key", API_KEY,
                                   "--admin-key", ADMIN_KEY, *args], log, threads=2) as (process, base):
        yield ServerProcess(process, base, log)


@pytest.fixture(scope="module")
def served(tiny_llama_path, bundle_path, tmp_path_factory):  # noqa: F811
    """One `python -m server` for a module's tests (max_seq_len 512): its `ServerProcess`."""
    tmp = tmp_path_factory.mktemp("served")
    with server_process(tiny_llama_path, copy_bundle(bundle_path, tmp / "bundle"), tmp / "server.log",
                        "--max-seq-len", "512") as server:
        yield server
