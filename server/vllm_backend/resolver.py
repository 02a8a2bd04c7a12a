"""A vLLM LoRA resolver: vLLM's own OpenAI server answers any task of an MHR bundle, materialized on demand.

vLLM calls `resolve_lora(base_model_name, lora_name)` for a `model` name it does not know. The resolver
looks the name up in the bundle, materializes the task's LoRA (or the zero-shot adapter for an unknown
name, when allowed), writes it once as a PEFT LoRA directory and hands vLLM its path.

Enable it (the package registers the entry point `vllm.general_plugins: mhr_bundle_resolver`):

    MHR_BUNDLE=path/to/bundle VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \\
        python -m vllm.entrypoints.openai.api_server --model BACKBONE --enable-lora --max-lora-rank R

Optional: MHR_LORA_CACHE_DIR (where adapters are written; default a RAM-backed temp dir when /dev/shm
exists), MHR_ZERO_SHOT_FALLBACK=0 (unknown names are then left to other resolvers / a 404).
vLLM keeps a resolved name for the life of the server: a task replaced in the bundle afterwards reaches
vLLM only after a restart (or through mhr's own vLLM engine, which unloads replaced tasks).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

import mhr
from mhr.bundle_check import BundleError, check_task_name

ENV_BUNDLE = "MHR_BUNDLE"
ENV_CACHE_DIR = "MHR_LORA_CACHE_DIR"
ENV_ZERO_SHOT = "MHR_ZERO_SHOT_FALLBACK"


class BundleResolver(LoRAResolver):
    """Resolves `model` names to the tasks of one bundle, reloading the bundle when it changes on disk."""

    def __init__(self, bundle_dir: Path, cache_dir: Path, zero_shot_fallback: bool = True) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.cache_dir = Path(cache_dir)
        self.zero_shot_fallback = zero_shot_fallback
        self._bundle = mhr.Bundle.load(self.bundle_dir)
        self._mtime = self._manifest_mtime()

    def _manifest_mtime(self) -> float:
        return (self.bundle_dir / "manifest.json").stat().st_mtime

    def _current_bundle(self) -> mhr.Bundle:
        if self._manifest_mtime() != self._mtime:
            self._mtime = self._manifest_mtime()
            self._bundle = mhr.Bundle.load(self.bundle_dir)
        return self._bundle

    def adapter_dir(self, lora_name: str) -> Path | None:
        """Write (once) and return the PEFT directory serving `lora_name`, or None if the bundle has no answer."""
        bundle = self._current_bundle()
        if lora_name in bundle.task_names:
            lora = bundle.task_lora(lora_name)
        elif self.zero_shot_fallback:
            lora = bundle.zero_shot_lora()
        else:
            return None
        # Name the directory by content so a replaced task never reuses a stale directory.
        out = self.cache_dir / f"{lora_name}.{lora.fingerprint()[:16]}"
        if not out.exists():
            mhr.export_peft(lora, out, base_model_name_or_path=bundle.backbone)
        return out

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            check_task_name(lora_name, where="model")
        except BundleError:
            return None
        path = await asyncio.to_thread(self.adapter_dir, lora_name)
        if path is None:
            return None
        # vLLM replaces the id with its own counter; any positive int is valid here.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path),
                           base_model_name=base_model_name)


def default_cache_dir() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="mhr-loras-", dir=shm if shm.is_dir() else None))


def register() -> None:
    """vLLM plugin entry point: register the resolver when MHR_BUNDLE is set (otherwise do nothing)."""
    bundle = os.environ.get(ENV_BUNDLE)
    if not bundle:
        return
    cache = os.environ.get(ENV_CACHE_DIR)
    resolver = BundleResolver(Path(bundle), Path(cache) if cache else default_cache_dir(),
                              zero_shot_fallback=os.environ.get(ENV_ZERO_SHOT, "1") not in ("0", "false", "False"))
    LoRAResolverRegistry.register_resolver("mhr bundle", resolver)
