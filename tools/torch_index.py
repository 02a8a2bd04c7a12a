"""Where `make` installs torch from: pip's own choice, unless that is a CUDA build on a machine without a GPU.

Prints the pip options (nothing, or `--index-url URL`) to add to `pip install torch==VERSION`, run with the
Python of the environment to install into:

    python tools/torch_index.py torch==2.13.0 [INDEX_URL]

A given INDEX_URL is used by itself. Otherwise the CPU index (https://download.pytorch.org/whl/cpu) is chosen
only when both hold: this machine has no NVIDIA GPU, and pip as configured here would install a CUDA build
(PyPI's Linux wheel, which pulls in GBs of nvidia-* and cuda-* packages). A pip that finds a CPU wheel on
its own (find-links, a mirror) keeps it, and so does an environment that already holds the requested torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is loaded or its tool is installed: the CUDA build can be used here."""
    return os.path.exists("/proc/driver/nvidia") or shutil.which("nvidia-smi") is not None


def pip_would_install(requirement: str) -> list[dict]:
    """The distributions `pip install requirement` would install here (dependencies left out), as pip's
    installation report lists them: nothing is downloaded but metadata. Empty when pip cannot tell (an old
    pip, no network): the install itself then says what is wrong."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps",
                           "--report", "-", requirement], capture_output=True, text=True)
    try:
        return json.loads(done.stdout)["install"] if done.returncode == 0 else []
    except (json.JSONDecodeError, KeyError):
        return []


def is_cuda_build(item: dict) -> bool:
    """A torch build that needs CUDA libraries: it depends on nvidia-* or cuda-* packages."""
    names = [entry.split(";")[0].strip().lower() for entry in item["metadata"].get("requires_dist") or []]
    return any(name.startswith(("nvidia-", "cuda-")) for name in names)


def index_options(requirement: str, index_url: str = "") -> list[str]:
    if index_url:
        return ["--index-url", index_url]
    if has_nvidia_gpu() or not any(is_cuda_build(item) for item in pip_would_install(requirement)):
        return []
    return ["--index-url", CPU_INDEX]


if __name__ == "__main__":
    print(" ".join(index_options(*sys.argv[1:3])))
