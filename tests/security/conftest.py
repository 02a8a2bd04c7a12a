"""Fixtures of the security tests: the tiny model and bundle of the server tests, served over real loopback,
in this process (`tests.server.loopback.serve_app`) or as the real `python -m server` process, whose memory and
event loop are its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(model: Path, bundle: Path, log: Path, *args: str) -> Iterator[ServerProcess]:
    """`python -m server` with an API key and an admin key on a free port, ready; killed afterwards."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--bundle", str(bundle), "--model", str(model), "--port", str(port),
             "--api-key", API_KEY, "--admin-key", ADMIN_KEY, *args],
            stdout=out, stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start: " + log.read_text()
            time.sleep(0.1)
        yield ServerProcess(process, base, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def served(tiny_llama_path, bundle_path, tmp_path_factory):  # noqa: F811
    """One `python -m server` for a module's tests (max_seq_len 512): its `ServerProcess`."""
    tmp = tmp_path_factory.mktemp("served")
    with server_process(tiny_llama_path, copy_bundle(bundle_path, tmp / "bundle"), tmp / "server.log",
                        "--max-seq-len", "512") as server:
        yield server
