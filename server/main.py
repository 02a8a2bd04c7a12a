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
    bundle: Annotated[str | None, Opt(help="MHR bundle directory [env MHR_BUNDLE]")] = None,
    model: Annotated[str | None, Opt(help="backbone: local path or hub id; default: the one the bundle names "
                                         "[env MHR_MODEL]")] = None,
    config: Annotated[Path | None, Opt(help="JSON file of settings (any field below) [env MHR_CONFIG]")] = None,
    device: Annotated[str | None, Opt(help="cpu, cuda, cuda:1, ... [default: cpu]")] = None,
    dtype: Annotated[str | None, Opt(help="float32 | bfloat16 | float16 [default: float32]")] = None,
    slots: Annotated[int | None, Opt(help="adapter slots per layer (incl. empty and zero-shot) [default: 16]")] = None,
    max_rank: Annotated[int | None, Opt(help="slot rank; larger uploads are refused [default: bundle's max]")] = None,
    max_running: Annotated[int | None, Opt(help="requests decoded together [default: 16]")] = None,
    max_seq_len: Annotated[int | None, Opt(help="prompt + generated tokens per request [default: 512]")] = None,
    max_waiting: Annotated[int | None, Opt(help="queued requests before 429 [default: 256]")] = None,
    zero_shot: Annotated[bool | None, Opt("--zero-shot/--no-zero-shot",
                                          help="serve unknown task names with the zero-shot adapter")] = None,
    host: Annotated[str | None, Opt(help="address to listen on [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, Opt(help="port [default: 8000]")] = None,
    api_key: Annotated[str | None, Opt(help="require 'Authorization: Bearer KEY' on /v1 [env MHR_API_KEY]")] = None,
    admin_key: Annotated[str | None, Opt(help="enable /admin routes, guarded by this key [env MHR_ADMIN_KEY]")] = None,
    drain_seconds: Annotated[float | None, Opt(help="on SIGTERM, seconds to drain [default: 30]")] = None,
) -> None:
    """Serve a bundle's tasks over HTTP (OpenAI-compatible and per-task routes, metrics, hot deploys)."""
    from server.config import ServerConfig, ServerConfigError

    options = {"bundle": bundle, "model": model, "device": device, "dtype": dtype, "n_slots": slots,
               "max_rank": max_rank, "max_running": max_running, "max_seq_len": max_seq_len,
               "max_waiting": max_waiting, "allow_zero_shot": zero_shot, "host": host, "port": port,
               "api_key": api_key, "admin_key": admin_key, "drain_seconds": drain_seconds}
    try:
        settings = ServerConfig.load(config, **{k: v for k, v in options.items() if v is not None})
    except ServerConfigError as e:
        _fail(str(e))
    run(settings)


def run(settings) -> None:
    """Load the model and bundle `settings` name, then serve until SIGINT/SIGTERM (draining first)."""
    import uvicorn

    import mhr
    from server.api import create_app
    from server.deploy import Deployer
    from server.engine import Engine

    try:
        engine = Engine.from_config(settings)
    except (mhr.BundleError, mhr.ConfigError, OSError, ValueError) as e:
        _fail(str(e))
    app = create_app(engine, api_key=settings.api_key, admin_key=settings.admin_key,
                     deployer=Deployer(engine, settings.bundle))
    typer.echo(f"serving {len(engine.tasks.task_names)} tasks of {settings.bundle} on "
               f"http://{settings.host}:{settings.port}", err=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=int(settings.drain_seconds))


def _fail(message: str) -> None:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    typer.echo(f"error: {'; '.join(lines)}", err=True)
    raise typer.Exit(2)


def main() -> None:
    typer.run(serve)
