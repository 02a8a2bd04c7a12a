"""Helpers of the admin and fault tests: bundle copies, engines on them, uploads, references, snapshots."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import mhr
from mhr.files import safetensors_bytes
from server.config import ServerConfig
from server.engine.core import Engine
from server.engine.requests import Request, SamplingParams
from server.main import app_for

ADMIN_KEY = "admin-key-0123456789"
API_KEY = "inference-key-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = "The quiet river copies the stone"
MAX_TOKENS = 8


def copy_bundle(bundle_path: Path, to: Path) -> Path:
    """A private copy of the session bundle, for tests that write to it."""
    shutil.copytree(bundle_path, to)
    return to


def engine_on(model_path, tokenizer, bundle: mhr.Bundle | Path, **overrides) -> Engine:
    """A fresh float32 engine on the tiny model serving `bundle` (in memory, or a directory)."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    if not isinstance(bundle, mhr.Bundle):
        bundle = mhr.Bundle.load(bundle)
    settings = dict(n_slots=8, max_running=16, max_seq_len=96, max_waiting=64) | overrides
    return Engine(model, bundle, ServerConfig(**settings), tokenizer)


def admin_app(engine: Engine, bundle_dir: Path, **settings):
    """The app `mhr serve` builds, with admin routes on `bundle_dir` (admin key ADMIN_KEY unless `settings`
    say otherwise)."""
    return app_for(ServerConfig(**({"bundle": str(bundle_dir), "admin_key": ADMIN_KEY} | settings)), engine)


def generate(engine: Engine, tokenizer, task: str, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS):
    """(text, adapter) of one greedy request computed by the engine directly."""
    (result,) = engine.generate([Request(tokenizer(prompt).input_ids, task,
                                         SamplingParams(max_new_tokens=max_tokens))])
    return result.text, result.adapter


def logits_upload(logits: dict[str, torch.Tensor]) -> bytes:
    return safetensors_bytes(logits)


def lora_upload(lora: mhr.LoRA) -> bytes:
    return safetensors_bytes({f"{m}.lora_{ab}": t[m] for m in lora.modules for ab, t in (("A", lora.A), ("B", lora.B))})


def archive(files: dict[str, bytes], kind: str) -> bytes:
    """A "tar.gz", "tar" or "zip" archive holding `files` (member name -> content), names kept as given."""
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz" if kind == "tar.gz" else "w") as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def directory_files(directory: Path, prefix: str = "adapter/") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def snapshot(bundle_dir: Path) -> dict[str, str]:
    """Every file of a bundle directory (the lock file aside) with the sha256 of its bytes."""
    return {str(p.relative_to(bundle_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(bundle_dir.rglob("*")) if p.is_file() and p.name != ".lock"}
