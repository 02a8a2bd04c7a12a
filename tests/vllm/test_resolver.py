"""vLLM's own OpenAI server, with the mhr resolver plugin, answers bundle tasks it was never told about.

Runs only where vLLM is installed (the `make test-vllm` environment); the reference is the routed MHR
model in transformers, greedy, float32, token for token.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

import mhr
from tests.processes import free_port

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = ["t0", "t1", "t2"]
PROMPTS = [[1, 17, 42, 99, 7, 250], [1, 5, 6, 7], [1, 300, 12, 77, 80, 81, 82, 90]]
MAX_TOKENS = 8


def _bundle(model_path, out):
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = mhr.MHRConfig(n_skills=4, n_heads=2, rank=4, alpha=8.0, target_modules=TARGETS)
    layers = mhr.inject(model, config, n_tasks=len(TASKS))
    gen = torch.Generator().manual_seed(1)
    for layer in layers.values():
        layer.lora_B.data.normal_(std=0.5, generator=gen)
        layer.router.logits.data.normal_(std=2.0, generator=gen)
    bundle = mhr.Bundle.from_model(model, config, backbone=str(model_path), tasks=TASKS)
    bundle.save(out)
    return bundle


def _reference(model_path, bundle, lora):
    """Greedy tokens of the backbone with `lora` applied, in transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    mhr.inject(model, bundle.config, n_tasks=0)
    mhr.load_lora(model, lora)
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        out.append(gen[0, len(prompt):].tolist())
    return out


@pytest.fixture(scope="module")
def served(tiny_llama_path, tmp_path_factory):
    bundle_dir = tmp_path_factory.mktemp("bundle") / "b"
    bundle = _bundle(tiny_llama_path, bundle_dir)
    port = free_port()
    env = {**os.environ, "MHR_BUNDLE": str(bundle_dir), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
           "MHR_LORA_CACHE_DIR": str(tmp_path_factory.mktemp("loras"))}
    log = open(tmp_path_factory.mktemp("log") / "vllm.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_llama_path),
         "--port", str(port), "--host", "127.0.0.1", "--enable-lora", "--max-lora-rank", "8",
         "--max-loras", "4", "--dtype", "float32", "--distributed-executor-backend", "uni",
         "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.1", "--max-model-len", "256"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"vLLM server did not start:\n{log.read()[-4000:]}")
                time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        yield client, bundle, tiny_llama_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _complete(client, model):
    out = client.completions.create(model=model, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    return [c.token_ids for c in sorted(out.choices, key=lambda c: c.index)]


def test_unknown_task_names_resolve_to_the_bundles_tasks(served):
    client, bundle, model_path = served
    answers = {}
    for task in ["t1", "t2"]:
        answers[task] = _complete(client, task)
        assert answers[task] == _reference(model_path, bundle, bundle.task_lora(task)), task
    assert answers["t1"] != answers["t2"], "tasks must differ, or the comparison proves nothing"
    listed = {m.id for m in client.models.list().data}
    assert {"t1", "t2"} <= listed


def test_names_outside_the_bundle_get_the_zero_shot_adapter(served):
    client, bundle, model_path = served
    assert _complete(client, "never-seen-task") == _reference(model_path, bundle, bundle.zero_shot_lora())
