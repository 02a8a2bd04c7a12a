"""The FastAPI app: routes, authentication and error bodies. HTTP <-> serving only.

Routes are a few lines each; conversion lives in `server.serving`, hot deploys in `server.deploy`, and
the engine knows nothing of HTTP. Every error, including validation errors and unknown routes, answers
with OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine import Engine
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    GenerateRequest,
    ModelList,
    SlotsRequest,
    SlotsResponse,
    TaskInfo,
    TaskList,
)
from server.serving import APIError, Serving
from server.task_views import model_list, task_info, task_list

ADAPTER_HEADER = "X-MHR-Adapter"


def create_app(engine: Engine, *, api_key: str | None = None, admin_key: str | None = None,
               deployer=None) -> FastAPI:
    """The app serving `engine`. `api_key` guards inference routes, `admin_key` the admin routes (off
    without one). `deployer` (a `server.deploy.Deployer`) handles admin changes to the bundle."""
    metrics = ServerMetrics(engine.stats)
    serving = Serving(engine, metrics)
    state = {"ready": False, "stopping": False}  # stopping: set by `begin_shutdown`, never cleared

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop_task = asyncio.create_task(engine.serve())
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False  # uvicorn has stopped accepting and drained open requests by now
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task

    app = FastAPI(title="mhr-serve", lifespan=lifespan)
    app.state.serving, app.state.metrics, app.state.lifecycle = serving, metrics, state
    _install_error_handlers(app, metrics)
    inference = Depends(_bearer_guard(api_key, "API key"))

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

    @app.get("/v1/models", dependencies=[inference])
    async def models() -> ModelList:
        return model_list(engine)

    @app.get("/v1/tasks", dependencies=[inference])
    async def tasks() -> TaskList:
        return task_list(engine)

    @app.get("/v1/tasks/{task}", dependencies=[inference])
    async def task(task: str) -> TaskInfo:
        return task_info(engine, task)

    @app.post("/v1/tasks/{task}/generate", dependencies=[inference])
    async def generate(task: str, body: GenerateRequest, request: Request) -> Response:
        if body.stream:
            prepared = serving.generate_inputs(task, body)
            handles = serving.submit(prepared)
            return _sse(serving.generate_stream(prepared, handles), prepared.adapter)
        result = await serving.generate(task, body, request.is_disconnected)
        return _json(result, result.adapter)

    @app.post("/v1/completions", dependencies=[inference])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        if body.stream:
            prepared = serving.completion_inputs(body)
            return _sse(serving.completion_stream(body, prepared, serving.submit(prepared)), prepared.adapter)
        result = await serving.completion(body, request.is_disconnected)
        return _json(result, result.mhr.adapter)

    @app.post("/v1/chat/completions", dependencies=[inference])
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        if body.stream:
            prepared = serving.chat_inputs(body)
            return _sse(serving.chat_stream(body, prepared, serving.submit(prepared)), prepared.adapter)
        result = await serving.chat(body, request.is_disconnected)
        return _json(result, result.mhr.adapter)

    admin = Depends(_bearer_guard(admin_key, "admin key", required=True))

    @app.put("/admin/slots", dependencies=[admin])
    async def slots(body: SlotsRequest) -> SlotsResponse:
        return await serving.resize_slots(body.n_slots)

    if deployer is not None:
        app.include_router(deployer.router(admin))
    return app


def begin_shutdown(app: FastAPI) -> None:
    """Answer /ready with 503 from now on, so load balancers stop routing here while requests drain.
    Called by the process entry the moment a stop signal arrives (see `server.main`)."""
    app.state.lifecycle["stopping"] = True


def _json(model, adapter: str) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), headers={ADAPTER_HEADER: adapter})


def _sse(lines: AsyncIterator[str], adapter: str) -> StreamingResponse:
    return StreamingResponse(lines, media_type="text/event-stream",
                             headers={ADAPTER_HEADER: adapter, "Cache-Control": "no-cache"})


def _bearer_guard(key: str | None, what: str, required: bool = False):
    """A dependency checking `Authorization: Bearer <key>` in constant time. Without a key: open, or,
    when `required`, refused (routes that must never be open, such as admin routes)."""
    expected = key.encode() if key else None

    async def guard(request: Request) -> None:
        if expected is None:
            if required:
                raise APIError(403, f"these routes are disabled: start the server with an {what} to enable them",
                               type="permission_error", code="disabled")
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, f"missing or wrong {what}: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    return guard


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
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        elif first["type"] == "model_attributes_type" and not where:  # a form, a string, no content type
            message = "the request body must be a JSON object, sent with Content-Type: application/json"
        text = f"{where}: {message}" if where else message
        more = len(e.errors()) - 1
        if more:
            text += f" (and {more} more problem{'s' if more > 1 else ''})"
        return body(400, text, "invalid_request_error", param=where or None, code=first["type"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return body(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        metrics.rejected("internal_error")
        return body(500, f"internal error: {type(e).__name__}: {e}", "server_error")
