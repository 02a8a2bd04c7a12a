"""Run an app with uvicorn on a real loopback port for the length of a `with` block; httpx calls for tests.

`get`, `post`, `put`, `delete`, `request` and `stream` are httpx's, with a timeout far above any request's time here
(httpx's default is 5 s), so that a slow machine fails no test while a hung server still does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import httpx
import uvicorn

TIMEOUT = 60.0
get, post, put, delete, request, stream = (
    partial(call, timeout=TIMEOUT)
    for call in (httpx.get, httpx.post, httpx.put, httpx.delete, httpx.request, httpx.stream))


@contextmanager
def serve_app(app, timeout: float = 30.0) -> Iterator[str]:
    """Start `app` in a thread on 127.0.0.1 (a free port); yields its base URL, then shuts it down."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
