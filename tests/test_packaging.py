"""The project as a user installs it: a wheel and an sdist built from the checkout carry every source the
compiled kernels need, and the wheel, installed (not editable) into a fresh virtual environment, serves a tiny
bundle with the compiled kernels on.

The fresh environment gets its dependencies (torch and the rest, gigabytes) from this one through a path
file rather than a download; the project itself is only the wheel's copy (checked: the checkout is not on
its path).
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.processes import free_port
from tests.server.admin_helpers import copy_bundle
from tests.server.conftest import ROUTED, bundle_path  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "server/model/csrc").iterdir())


def build(kind: str, out: Path) -> Path:
    """Build the project's wheel or sdist into `out` with setuptools' PEP 517 backend (no network)."""
    script = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build("wheel", tmp_path_factory.mktemp("dist"))


def test_the_wheel_and_the_sdist_carry_every_kernel_source(wheel, tmp_path):
    assert {"server/model/csrc/simd.h", "server/model/csrc/mix_skills.cpp"} <= set(KERNEL_SOURCES)
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert set(KERNEL_SOURCES) <= in_wheel, set(KERNEL_SOURCES) - in_wheel
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "training/assets/backbone").iterdir()}
    assert shipped and shipped <= in_wheel, shipped - in_wheel  # the generic backbone the mhr commands use
    sdist = build("sdist", tmp_path)
    with tarfile.open(sdist) as t:
        in_sdist = {name.split("/", 1)[1] for name in t.getnames() if "/" in name}
    assert set(KERNEL_SOURCES) <= in_sdist, set(KERNEL_SOURCES) - in_sdist


def test_the_installed_wheel_serves_with_the_compiled_kernels(wheel, tiny_llama_path, bundle_path, tmp_path):  # noqa: F811
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, env = venv / "bin" / "python", {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300, env=env)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    where = subprocess.run([str(python), "-c", "import server; print(server.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the wheel's copy, not the checkout
    bundle = copy_bundle(bundle_path, tmp_path / "bundle")
    port = free_port()
    env |= {"MHR_KERNEL_DIR": str(tmp_path / "kernels"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(venv / "bin" / "mhr"), "serve", "--bundle", str(bundle), "--model",
                                    str(tiny_llama_path), "--port", str(port), "--cpu-kernel"], cwd=tmp_path,
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        answer = _first_answer(f"http://127.0.0.1:{port}", process, log)
    finally:
        process.kill()
        process.wait()
    assert 1 <= answer["usage"]["completion_tokens"] <= 2 and answer["mhr"]["adapter"] == ROUTED[0], answer
    text = log.read_text()
    assert "compiling the CPU kernels" in text and "CPU kernels unavailable" not in text, text


def _first_answer(base: str, process: subprocess.Popen, log: Path) -> dict:
    import time

    deadline = time.monotonic() + 240  # the first start compiles the kernels
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            r = httpx.post(f"{base}/v1/completions", timeout=30,
                           json={"model": ROUTED[0], "prompt": "The quiet river", "max_tokens": 2})
            assert r.status_code == 200, r.text
            return r.json()
        except httpx.TransportError:
            time.sleep(0.5)
    raise AssertionError("the installed server did not answer: " + log.read_text())
