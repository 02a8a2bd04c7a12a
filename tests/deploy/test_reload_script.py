"""deploy/reload-all.sh against a stand-in cluster: kubectl is a stub script that answers the EndpointSlice
queries, the "replicas" are one local HTTP server that records what it receives."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "reload-all.sh"

pytestmark = pytest.mark.skipif(not shutil.which("curl") or not shutil.which("bash"), reason="needs bash and curl")


class Replica(http.server.BaseHTTPRequestHandler):
    """Answers POST /admin/reload like the server: 200 with the right key, 401 without; `status` forces
    another answer (a replica whose reload fails)."""

    calls: list[tuple[str, str]] = []
    status = 200

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.calls.append((self.path, self.headers.get("Authorization", "")))
        ok = self.headers.get("Authorization") == "Bearer secret"
        code = self.status if ok else 401
        body = b'{"tasks": 3}' if code == 200 else b'{"error": {"message": "no"}}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def replica():
    Replica.calls, Replica.status = [], 200
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replica)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def fake_kubectl(tmp_path: Path, port: int, pods: list[str]) -> Path:
    """A kubectl that prints what the two jsonpath queries of the script would print for `pods`, and
    records its arguments."""
    lines = "".join(f"{pod} 127.0.0.1\\n" for pod in pods)
    stub = tmp_path / "kubectl"
    stub.write_text(f"""#!/usr/bin/env bash
echo "$@" >> {tmp_path}/kubectl.log
case "$*" in
  *ports*) printf '%s' {port} ;;
  *endpoints*) printf '{lines}' ;;
  *) exit 1 ;;
esac
""")
    stub.chmod(0o755)
    return stub


def run(tmp_path, kubectl, *args, key="secret"):
    environment = {**os.environ, "KUBECTL": str(kubectl), "MHR_ADMIN_KEY": key}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env=environment)


def test_shellcheck_clean():
    local = Path(sys.executable).parent / "shellcheck"
    found = str(local) if local.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck is missing: install the dev extra (pip install -e '.[dev]')")
    run = subprocess.run([found, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_reloads_every_ready_endpoint(tmp_path, replica):
    kubectl = fake_kubectl(tmp_path, replica.server_port, ["mhr-a", "mhr-b"])
    result = run(tmp_path, kubectl, "-n", "serving", "-s", "mhr")
    assert result.returncode == 0, result.stderr
    assert Replica.calls == [("/admin/reload", "Bearer secret")] * 2
    assert "mhr-a: reloaded" in result.stdout and "mhr-b: reloaded" in result.stdout
    log = (tmp_path / "kubectl.log").read_text()
    assert "--namespace serving" in log and "kubernetes.io/service-name=mhr" in log


def test_failure_is_reported(tmp_path, replica):
    Replica.status = 500
    kubectl = fake_kubectl(tmp_path, replica.server_port, ["mhr-a"])
    result = run(tmp_path, kubectl)
    assert result.returncode == 1
    assert "mhr-a: reload FAILED" in result.stderr


def test_needs_the_admin_key(tmp_path, replica):
    kubectl = fake_kubectl(tmp_path, replica.server_port, ["mhr-a"])
    result = run(tmp_path, kubectl, key="")
    assert result.returncode == 2 and "MHR_ADMIN_KEY" in result.stderr
    assert Replica.calls == []


def test_no_endpoints(tmp_path, replica):
    kubectl = fake_kubectl(tmp_path, replica.server_port, [])
    result = run(tmp_path, kubectl)
    assert result.returncode == 1 and "no ready endpoints" in result.stderr
