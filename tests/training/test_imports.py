"""`training` never imports `server` (the server uses training's adaptation code, not the reverse)."""

import json
import pkgutil
import subprocess
import sys

import training


def test_no_training_module_pulls_in_server_code():
    modules = [m.name for m in pkgutil.walk_packages(training.__path__, "training.")
               if m.name not in ("training.__main__",)]
    code = ("import importlib, sys, json\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True).stdout))
    assert "training" in loaded and "server" not in loaded and "fastapi" not in loaded
