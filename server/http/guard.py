"""The gate every HTTP request passes before the app reads a byte of its body: request id, key, body size.

An ASGI middleware, so that its checks run before FastAPI reads and parses a body (FastAPI parses the
body before it runs a route's dependencies, so a key checked there comes too late: a 50 MB body without
a key would be read and parsed first). In order:

1. every request gets an id, answered in the `X-Request-Id` header and carried by 500 error bodies, so
   that a client's report can be matched with the server's log;
2. the key: `/v1/*` and `/openapi.json` need the API key when one is set; `/admin/*` needs the admin key
   and is refused when none is set; `/health`, `/ready` and `/metrics` are open;
3. the body: a declared `Content-Length` over the route's limit is refused at once (413), and a body sent
   in chunks is read up to the limit and no further. Uploads (`PUT`/`POST /admin/tasks/...`) have their own,
   larger limit and are streamed to `server.http.deploy`, which counts them; every other body is read here
   whole and handed on.
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.http.errors import APIError

Scope, Message = dict, dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"
UPLOADS = "/admin/tasks/"  # + a task name, nothing after it: the upload routes


@dataclass(frozen=True)
class Limits:
    """Keys and body limits of the gate. A key of None leaves its routes open (admin routes: disabled)."""

    api_key: str | None
    admin_key: str | None
    max_body_bytes: int     # every request body but uploads
    max_upload_bytes: int   # uploads (PUT/POST /admin/tasks/...), counted by `server.http.deploy` as they stream


class RequestGuard:
    """ASGI middleware: see the module docstring. `rejected(reason)` counts each refusal (a metrics hook)."""

    def __init__(self, app: ASGIApp, limits: Limits, rejected: Callable[[str], None] = lambda reason: None) -> None:
        self.app, self.limits, self.rejected = app, limits, rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        send = _with_header(send, REQUEST_ID_HEADER, request_id)
        try:
            self._check_key(scope)
            receive = await self._bounded(scope, receive)
        except APIError as refusal:
            self.rejected(refusal.code)
            await _answer(send, refusal)
            return
        await self.app(scope, receive, send)

    def _check_key(self, scope: Scope) -> None:
        path = scope["path"]
        if path.startswith("/admin/") or path == "/admin":
            expected, what = self.limits.admin_key, "admin key"
            if expected is None:
                raise APIError(403, "the admin routes are disabled: start the server with an admin key "
                                    "(--admin-key or MHR_ADMIN_KEY) to enable them", type="permission_error",
                               code="disabled")
        elif path.startswith("/v1/") or path in ("/v1", "/openapi.json"):
            expected, what = self.limits.api_key, "API key"
        else:
            return
        if expected is None:
            return
        scheme, _, token = _header(scope, b"authorization").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise APIError(401, f"missing or wrong {what}: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key", headers={"www-authenticate": "Bearer"})

    async def _bounded(self, scope: Scope, receive: Receive) -> Receive:
        """`receive` for the app: an upload's, passed through after its declared size is checked; any other
        body's, read whole here (at most the limit) and replayed."""
        path = scope["path"]
        upload = scope["method"] in ("PUT", "POST") and path.startswith(UPLOADS) and "/" not in path[len(UPLOADS):]
        limit = self.limits.max_upload_bytes if upload else self.limits.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit, f"{declared} bytes")
        if upload:
            return receive
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return _replay(b"", receive, first=message)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                raise _too_large(limit, "more")
        return _replay(bytes(body), receive)


def _too_large(limit: int, sent: str) -> APIError:
    return APIError(413, f"the request body ({sent}) is larger than this server's limit of {limit} bytes: send "
                         "fewer or shorter prompts, or raise --max-body-mb", code="request_too_large")


def _replay(body: bytes, receive: Receive, first: Message | None = None) -> Receive:
    """A `receive` that hands out `body` (or `first`) once, then whatever the client sends next (a disconnect)."""
    pending = [first or {"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _with_header(send: Send, name: str, value: str) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (name.encode(), value.encode())]
        await send(message)

    return sending


async def _answer(send: Send, refusal: APIError) -> None:
    body = json.dumps(refusal.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.encode(), v.encode()) for k, v in refusal.headers.items())]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
