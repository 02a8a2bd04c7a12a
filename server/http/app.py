"""The FastAPI app: routes, authentication and error bodies. HTTP <-> serving only.

Routes are a few lines each; conversion lives in `server.http.serving`, hot deploys in `server.http.deploy`, keys
and body limits in `server.http.guard` (checked before a body is read), and the engine knows nothing of HTTP.
Every error, including validation errors and unknown routes, answers with OpenAI's error body; an
unexpected error's body carries the request id under which the server logs it, never its text. The
OpenAPI schema (`/openapi.json`, without the admin routes) is served only when asked for, behind the API
key; no documentation page is served (it would load its scripts from a CDN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.contract import ServingEngine
from server.engine.tasks import ZERO_SHOT
from server.http.admin_protocol import SlotsRequest, SlotsResponse
from server.http.catalog import model_list, task_info, task_list
from server.http.deploy import Deployer
from server.http.errors import APIError
from server.http.guard import REQUEST_ID_HEADER, Limits, RequestGuard
from server.http.jobs import JobLimits, JobRunner
from server.http.metrics import CONTENT_TYPE, ServerMetrics
from server.http.protocol import (
    MAX_BATCH_INPUTS,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    GenerateRequest,
    ModelList,
    TaskInfo,
    TaskList,
)
from server.http.serving import Serving

ADAPTER_HEADER = "X-MHR-Adapter"
ZERO_SHOT_HEADER = "X-MHR-Zero-Shot"  # on responses the zero-shot adapter served: which candidate it is
MiB = 2**20
log = logging.getLogger(__name__)


def create_app(engine: ServingEngine, *, api_key: str | None = None, admin_key: str | None = None,
               deployer: Deployer | None = None, job_limits: JobLimits | None = None,
               max_body_bytes: int | None = None, api_docs: bool = False) -> FastAPI:
    """The app serving `engine`. `api_key` guards inference routes, `admin_key` the admin routes (off
    without one). `deployer` handles admin changes to the bundle, and adaptation jobs (`server.http.jobs`,
    within `job_limits`) deploy through it. `max_body_bytes` bounds every request body but uploads (None:
    `default_body_limit`); `api_docs` serves the OpenAPI schema."""
    metrics = ServerMetrics(engine.stats, lambda: engine.tasks.zero_shot_source)
    serving = Serving(engine, metrics)
    state = {"ready": False, "stopping": False}  # stopping: set by `begin_shutdown`, never cleared
    app = FastAPI(title="mhr-serve", lifespan=_lifespan(engine, state), docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if api_docs else None)
    app.state.serving, app.state.metrics, app.state.lifecycle = serving, metrics, state
    _install_error_handlers(app, metrics)
    limits = Limits(api_key, admin_key, max_body_bytes or default_body_limit(serving.max_prompt_chars),
                    deployer.max_upload_bytes if deployer is not None else 0)
    app.add_middleware(RequestGuard, limits=limits, rejected=metrics.rejected)
    _add_operations(app, engine, metrics, state)
    _add_inference(app, engine, serving)

    @app.put("/admin/slots", include_in_schema=False)
    async def slots(body: SlotsRequest) -> SlotsResponse:
        return await serving.resize_slots(body.n_slots)

    if deployer is not None:
        app.state.jobs = JobRunner(deployer, metrics, job_limits or JobLimits())
        app.include_router(deployer.router(), include_in_schema=False)
        app.include_router(app.state.jobs.router(), include_in_schema=False)
    return app


def _lifespan(engine: ServingEngine, state: dict):
    """Run the engine for as long as the app serves; `state` says when it is ready."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop_task = asyncio.create_task(engine.serve())
        state["loop"] = asyncio.get_running_loop()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False  # uvicorn has stopped accepting and drained open requests by now
            if hasattr(app.state, "jobs"):
                await app.state.jobs.close()
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task

    return lifespan


def _add_operations(app: FastAPI, engine: ServingEngine, metrics: ServerMetrics, state: dict) -> None:
    """Probes and metrics: /health, /ready, /metrics."""

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if not state["ready"] or state["stopping"]:
            raise APIError(503, "not ready: the engine is starting or shutting down", type="server_error",
                           code="not_ready")
        return JSONResponse({"status": "ready", "tasks": len(engine.tasks)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)


def _add_inference(app: FastAPI, engine: ServingEngine, serving: Serving) -> None:
    """The /v1 routes: OpenAI's completions, chat completions and models, and the native task routes."""

    @app.get("/v1/models")
    async def models() -> ModelList:
        return model_list(engine)

    @app.get("/v1/tasks")
    async def tasks() -> TaskList:
        return task_list(engine)

    @app.get("/v1/tasks/{task}")
    async def task(task: str) -> TaskInfo:
        return task_info(engine, task)

    @app.post("/v1/tasks/{task}/generate")
    async def generate(task: str, body: GenerateRequest, request: Request) -> Response:
        if body.stream:
            return _sse(*await serving.generate_stream(task, body, request.is_disconnected), engine)
        result = await serving.generate(task, body, request.is_disconnected)
        return _json(result, result.adapter, engine)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if body.stream:
            return _sse(*await serving.completion_stream(body, request.is_disconnected), engine)
        result = await serving.completion(body, request.is_disconnected)
        return _json(result, result.mhr.adapter, engine)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        if body.stream:
            return _sse(*await serving.chat_stream(body, request.is_disconnected), engine)
        result = await serving.chat(body, request.is_disconnected)
        return _json(result, result.mhr.adapter, engine)


def default_body_limit(max_prompt_chars: int) -> int:
    """Bytes a request body may have by default: room for a full batch of the longest prompts that can fit
    (up to 6 bytes a character, as JSON escapes them), within 1 to 64 MiB."""
    return min(max(MAX_BATCH_INPUTS * max_prompt_chars * 6 + 64 * 1024, MiB), 64 * MiB)


UNION_TAGS = {"str", "int", "float", "bool"}  # pydantic's names of a union's members in an error's location


def explain_invalid(errors: list[dict]) -> tuple[str | None, str, str]:
    """(param, message, code) of a request that failed validation: the most telling error first (the server's
    own checks and undecodable text, then errors outside a union's failed alternatives), its field path without
    pydantic's union tags, and how many other fields have problems."""
    def where(error: dict) -> str:
        return ".".join(str(p) for p in error["loc"][1:] if not (isinstance(p, str) and ("[" in p or p in UNION_TAGS)))

    def rank(error: dict) -> int:
        if error["type"] in ("value_error", "string_unicode"):
            return 0
        return 1 if not any(isinstance(p, str) and "[" in p for p in error["loc"]) else 2

    first = min(errors, key=rank)
    param, message = where(first), first["msg"].removeprefix("Value error, ")
    if first["type"] == "json_invalid":  # its location is a character offset, not a field
        message = (f"the request body is not valid JSON at character {param or 0} (counting from 0): "
                   f"{first.get('ctx', {}).get('error', 'parse error')}")
        param = ""
    elif first["type"] == "string_unicode":
        message = "the text is not valid Unicode (a lone surrogate?): send text that encodes as UTF-8"
    elif first["type"] == "model_attributes_type" and not param:  # a form, a string, no content type
        message = "the request body must be a JSON object, sent with Content-Type: application/json"
    text = f"{param}: {message}" if param else message
    more = len({where(e) for e in errors} - {param})
    if more:
        text += f" (and {more} more field{'s' if more > 1 else ''} with problems)"
    return param or None, text, first["type"]


def begin_shutdown(app: FastAPI, drain_seconds: float | None = None) -> None:
    """Answer /ready with 503 from now on, so load balancers stop routing here while requests drain; with
    `drain_seconds`, end the streams and requests still open shortly before that deadline (an error event,
    a 503), so that none is cut off mid-body when the server closes its connections. Called by the process
    entry the moment a stop signal arrives (see `server.main`); safe to call from a signal handler."""
    state = app.state.lifecycle
    state["stopping"] = True
    loop = state.get("loop")
    if drain_seconds is not None and loop is not None:
        cut_after = max(0.0, drain_seconds - min(1.0, 0.2 * drain_seconds))  # the margin: time to send the ends
        loop.call_soon_threadsafe(loop.call_later, cut_after, app.state.serving.runner.cut_streams)


def _adapter_headers(adapter: str, engine: ServingEngine) -> dict[str, str]:
    """The adapter that served a response, and for the zero-shot adapter which candidate it is."""
    if adapter == ZERO_SHOT:
        return {ADAPTER_HEADER: adapter, ZERO_SHOT_HEADER: engine.tasks.zero_shot_source}
    return {ADAPTER_HEADER: adapter}


def _json(model, adapter: str, engine: ServingEngine) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), headers=_adapter_headers(adapter, engine))


def _sse(lines: AsyncIterator[str], adapter: str, engine: ServingEngine) -> StreamingResponse:
    return StreamingResponse(lines, media_type="text/event-stream",
                             headers=_adapter_headers(adapter, engine) | {"Cache-Control": "no-cache"})


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def body(status: int, message: str, type: str, param=None, code=None, headers=None) -> JSONResponse:
        error = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
        return JSONResponse(error.model_dump(), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        if e.status >= 400:
            metrics.rejected(e.code or str(e.status))
        return body(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        metrics.rejected("invalid_request")
        param, message, code = explain_invalid(e.errors())
        return body(400, message, "invalid_request_error", param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return body(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        metrics.rejected("internal_error")
        request_id = request.scope.get("state", {}).get("request_id", "unknown")
        log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=e)
        return body(500, f"internal error: the server's log has the details under request id {request_id}",
                    "server_error", code="internal_error", headers={REQUEST_ID_HEADER: request_id})
