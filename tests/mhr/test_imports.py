"""`import mhr` stays a pure-torch library: no server, training, HTTP or vLLM code comes along."""

import json
import subprocess
import sys


def test_import_mhr_pulls_in_no_server_training_or_vllm_code():
    code = "import sys, json, mhr; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True).stdout))
    assert "mhr" in loaded and "torch" in loaded
    assert not loaded & {"fastapi", "starlette", "uvicorn", "vllm", "training", "server", "peft", "typer"}
