"""The compiled CPU kernels (`csrc/`), built on first use into one library.

`panel_linear()` returns the op `panel_linear(y, x, panels, bias, A=None, B=None, slots=None)` (y = x @ W^T
+ b with W packed once as column panels, plus each row's adapter x @ A[slot] @ B[slot] when given; the
backbone's linears, adapted or not), `mix_skills()` the op `mix_skills(outs, srcs, ws)` (each out = the
w-weighted sum of its src's skills, written into strided slot storage; a routed task's materialization).
Both are None when the library cannot be built here (the engine does not ask when its `cpu_kernel`
setting is off). It is compiled by torch's C++ extension loader for this machine's CPU (-O3 -march=native,
OpenMP threads from torch's pool) once per source, CPU model, C++ compiler and Python environment, one
process at a time, under ~/.cache/mhr-serve/kernels ($MHR_KERNEL_DIR overrides); later processes load the
built library in milliseconds. Without a C++ compiler the engine falls back to torch ops: same results up to float
rounding, slower decode and cold tasks.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("mix_skills.cpp", "panel_linear.cpp")]
HEADERS = [Path(__file__).parent / "csrc" / "simd.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_built: dict[str, bool] = {}


def mix_skills():
    """The mixing op, building the library on the first call of the process; None (logged once) if it cannot."""
    return torch.ops.mhr_serve.mix_skills if _library() else None


def panel_linear():
    """The linears' op (adapters included), building the library on the first call of the process; None (logged
    once) if it cannot."""
    return torch.ops.mhr_serve.panel_linear if _library() else None


def _library() -> bool:
    with _lock:
        if "ok" not in _built:
            _built["ok"] = _build()
        return _built["ok"]


def environment() -> dict[str, str]:
    """What a build depends on besides the sources and the CPU, for this process.

    The build files name this Python environment's torch (headers, libraries) by path: two environments
    sharing one build directory, even with the same torch version, would each rebuild the other's library.
    """
    compiler = os.environ.get("CXX", "c++")  # what torch's loader compiles with
    return {"prefix": sys.prefix, "torch": torch.__version__,
            "compiler": os.path.realpath(shutil.which(compiler) or compiler)}


def build_name(env: Mapping[str, str] | None = None) -> str:
    """A name unique to the source, flags, CPU model and `env` (default: this process's `environment()`):
    one library per kind of machine and Python environment."""
    key = hashlib.sha256()
    parts = [source.read_bytes() for source in SOURCES + HEADERS]
    env = environment() if env is None else env
    for part in (*parts, " ".join(FLAGS), _cpu_model(), *(f"{k}={v}" for k, v in sorted(env.items()))):
        key.update(part if isinstance(part, bytes) else part.encode())
    return f"mhr_cpu_ops_{key.hexdigest()[:12]}"


def build_directory(env: Mapping[str, str] | None = None) -> Path:
    """Where the library of `env` (default: this process's) is built and kept."""
    root = Path(os.environ.get("MHR_KERNEL_DIR", Path.home() / ".cache" / "mhr-serve" / "kernels"))
    return root / build_name(env)


def _cpu_model() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))


def _build() -> bool:
    try:  # a source missing from an install must fall back too, not stop the engine's start
        directory = build_directory()
        name = directory.name
        from torch.utils import cpp_extension

        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "build.flock", "w") as held:
            # One build at a time across processes; the OS drops this lock if its holder dies, whereas
            # torch's own lock file, left behind by a killed build, would make every later start wait forever.
            fcntl.flock(held, fcntl.LOCK_EX)
            (directory / "lock").unlink(missing_ok=True)
            if not (directory / f"{name}.so").exists():
                log.info("compiling the CPU kernels into %s (once per machine, ~20 s)", directory)
            cpp_extension.load(name=name, sources=[str(source) for source in SOURCES], extra_cflags=FLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False,
                               verbose=False)
    except Exception as e:  # no compiler or source, no ninja, unsupported flags, unwritable cache: torch ops
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        log.warning("CPU kernels unavailable (%s): the backbone's linears, decode batches and cold tasks use torch "
                    "ops (slower). Install a C++ compiler (g++) and ninja to enable them, or set cpu_kernel=false "
                    "to skip this build.", reason)
        return False
    return True
