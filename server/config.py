"""ServerConfig: every setting of one serving process, from defaults, a JSON file, MHR_* env vars and flags.

The engine reads the model, bundle, device and budgets; the HTTP side the address, keys and drain time.
Validation collects every problem before raising, naming each setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mhr.files import FileFormatError, read_json_object

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENV_PREFIX = "MHR_"


class ServerConfigError(ValueError):
    """Invalid settings; the message lists every problem found, one per line."""


class ServerConfig(BaseSettings):
    """Configuration of one serving process (one backbone, one bundle).

    Args:
        model: path or hub id of the backbone (a transformers causal LM); empty: the one the bundle names.
        bundle: path of the MHR bundle directory.
        device: torch device the backbone, adapter slots, skill inventory and KV cache live on.
        dtype: backbone and slot dtype: "float32", "bfloat16" or "float16".
        n_slots: adapter slots per layer, slot 0 (no adapter) and the zero-shot slot included.
        max_rank: rank of every slot; a task of higher rank is refused. None: the bundle's largest.
        max_running: sequences decoded together (rows of the KV cache).
        max_seq_len: positions per KV row: prompt plus generated tokens of one request.
        max_waiting: requests queued for admission; one more fails fast (HTTP 429).
        max_prefill_tokens: prompt tokens prefilled in one step; a longer prompt is started alone and
            prefilled that many tokens a step while the running requests keep decoding (prompts that fit in
            half of it start beside its chunks).
        prefix_cache_mb: MiB of prompt prefixes' keys and values kept for reuse (`server.engine.prefix_cache`): a
            prompt that starts like an earlier one under the same adapter skips prefilling the shared whole
            blocks of 16 tokens. 0: off (the torch engine's).
        allow_zero_shot: serve tasks the bundle lacks with the zero-shot adapter (else refuse them).
        host, port: where the HTTP server listens.
        api_key: when set, inference routes need "Authorization: Bearer <api_key>".
        admin_key: when set, enables the admin routes, guarded by this key (off without one).
        drain_seconds: on SIGTERM, how long running requests may take to finish.
        kv_dtype: dtype of the KV cache, in which the lean Llama-family forward attends: "auto" (dtype, except
            a bfloat16 or float16 model on a CPU without instructions for it: float32, for twice the cache's
            memory, since torch's half-precision attention there takes 2-5x the time; `server.engine.kv_cache`),
            "float32", "bfloat16" or "float16".
        cpu_kernel: on CPU in float32 or bfloat16, run the backbone's linears with the requests' adapters,
            and cold tasks, with the compiled kernels (`server.model.cpu_kernel`, built on first use; torch ops if
            they cannot be built).
        compile: run the torch engine's decode steps (Llama-family backbones) as a compiled graph
            (`server.model.compiled`: torch.compile, one graph per bucket of rows, all compiled as the engine
            starts; CUDA graphs on GPU); eager if the compilation fails (logged). Steps with prompts in them run
            eagerly.
        max_upload_mb: largest admin upload (the request body, and what an uploaded archive unpacks to), MiB.
        max_body_mb: largest body of any other request, MiB; a larger one is refused (413) before it is read.
            None: room for a full batch of the longest prompts that fit in max_seq_len (1 to 64 MiB;
            `server.http.app.default_body_limit`).
        api_docs: serve the OpenAPI schema at /openapi.json (behind the API key, without the admin routes).
        max_jobs: adaptation jobs (`POST /admin/tasks/{task}/adapt`) training at once; they take turns.
        max_queued_jobs: jobs waiting for a turn to start; one more is refused (HTTP 429).
        job_share: while requests are running, the share of the engine's time adaptation jobs may take
            (between steps; an idle engine gives them all of it).
        max_job_examples: examples one adaptation job or routing search may carry.
        engine: "torch" (the embedded engine, `server.engine.core`) or "vllm" (`server.vllm_backend.engine`; needs the
            `vllm` extra). The vLLM engine reads model, dtype, max_rank (rounded up to a rank vLLM
            accepts), max_running, max_seq_len, max_waiting, allow_zero_shot and the vllm_* settings;
            device, n_slots and kv_dtype are the torch engine's.
        vllm_max_loras: adapters vLLM batches together (its max_loras).
        vllm_max_cpu_loras: adapters kept registered in vLLM and on disk; idle ones beyond it are unloaded
            (least recently used first) and their directories deleted.
        vllm_gpu_memory_utilization: share of device memory vLLM may take (on CPU: of host memory, model
            and KV cache included).
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    model: str = ""
    bundle: str = ""
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    n_slots: int = Field(16, ge=3, description="empty slot, zero-shot slot and at least one task")
    max_rank: int | None = Field(None, ge=1)
    max_running: int = Field(16, ge=1)
    max_seq_len: int = Field(512, ge=2)
    max_waiting: int = Field(256, ge=1)
    max_prefill_tokens: int = Field(2048, ge=1)
    prefix_cache_mb: float = Field(0.0, ge=0, allow_inf_nan=False)
    allow_zero_shot: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, min_length=8)
    admin_key: str | None = Field(None, min_length=8)
    drain_seconds: float = Field(30.0, ge=0, allow_inf_nan=False)
    kv_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cpu_kernel: bool = True
    compile: bool = False
    max_upload_mb: float = Field(256.0, gt=0, allow_inf_nan=False)
    max_body_mb: float | None = Field(None, gt=0, allow_inf_nan=False)
    api_docs: bool = False
    max_jobs: int = Field(1, ge=1)
    max_queued_jobs: int = Field(4, ge=0)
    job_share: float = Field(0.1, gt=0, le=1)
    max_job_examples: int = Field(1024, ge=1)
    engine: Literal["torch", "vllm"] = "torch"
    vllm_max_loras: int = Field(8, ge=1)
    vllm_max_cpu_loras: int = Field(32, ge=1)
    vllm_gpu_memory_utilization: float = Field(0.2, gt=0, le=1)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            problems = [f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']} (got {err.get('input')!r})"
                        for err in e.errors()]
            raise ServerConfigError("invalid server settings:\n  " + "\n  ".join(problems)) from None

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"{device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        return device

    @model_validator(mode="after")
    def _vllm_loras(self) -> ServerConfig:
        if self.vllm_max_cpu_loras < self.vllm_max_loras:
            raise ValueError(f"vllm_max_cpu_loras ({self.vllm_max_cpu_loras}) must be >= vllm_max_loras "
                             f"({self.vllm_max_loras})")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_body_bytes(self) -> int | None:
        return None if self.max_body_mb is None else int(self.max_body_mb * 2**20)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> ServerConfig:
        """Settings from, in rising priority: defaults, `config_file` (or $MHR_CONFIG; JSON), MHR_* environment
        variables, `overrides` (command-line options)."""
        path = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG")
        from_file = _read_settings_file(Path(path)) if path else {}
        in_env = {name for name in cls.model_fields if f"{ENV_PREFIX}{name.upper()}" in os.environ}
        return cls(**{k: v for k, v in from_file.items() if k not in in_env}, **overrides)


def _read_settings_file(path: Path) -> dict[str, Any]:
    try:
        data = read_json_object(path, "a settings file")
    except FileFormatError as e:
        raise ServerConfigError(str(e)) from None
    unknown = sorted(set(data) - set(ServerConfig.model_fields))
    if unknown:
        raise ServerConfigError(f"{path}: unknown setting(s) {unknown}; known: {sorted(ServerConfig.model_fields)}")
    return data
