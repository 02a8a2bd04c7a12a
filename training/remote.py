"""`mhr adapt --server`: adaptation by a running server (its `POST /admin/tasks/{task}/adapt` job), followed
until the task is live.

The examples are read as `mhr adapt` reads them and sent with the settings given; the server trains the task as
`mhr adapt` would (same seed, examples and settings, same adapter) on the backbone it serves, and deploys it.
Interrupting the command (Ctrl-C) cancels the job. Plain HTTP through the standard library.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from training.data import Example

POLL_SECONDS = 0.5
# The TrainConfig fields a job takes (`server.http.admin_protocol.AdaptRequest`): the rest are the server's.
REMOTE_SETTINGS = ("method", "steps", "lr", "logits_lr", "batch_size", "grad_accum", "warmup_steps", "schedule",
                   "weight_decay", "max_grad_norm", "seed")
ENDED = ("done", "failed", "cancelled")


class RemoteError(RuntimeError):
    """The server refused a request or could not be reached; the message says which and why."""


class Server:
    """The admin routes of one server: `url` (http://host:port) with its admin key."""

    def __init__(self, url: str, admin_key: str | None, timeout: float = 60.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self.headers = {"Content-Type": "application/json"}
        if admin_key:
            self.headers["Authorization"] = f"Bearer {admin_key}"

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=self.headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise RemoteError(f"{method} {path}: {e.code} {_message(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RemoteError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from None


def adapt_remote(server: Server, task: str, examples: list[Example], settings: dict[str, Any], *,
                 replace: bool = False, progress: bool = True) -> dict:
    """Start the job, follow it with a progress bar; returns the ended job (RemoteError unless it is done)."""
    body = {"examples": [{"input": e.input, "output": e.target} for e in examples], "replace": replace, **settings}
    job = server.call("POST", f"/admin/tasks/{task}/adapt", body)
    bar = tqdm(total=job["steps"], desc=f"job {job['id']} ({job['method']})", unit="step", dynamic_ncols=True,
               disable=not progress)
    try:
        while job["state"] not in ENDED:
            time.sleep(POLL_SECONDS)
            job = server.call("GET", f"/admin/jobs/{job['id']}")
            bar.update(job["step"] - bar.n)
            if job["loss"] is not None:
                bar.set_postfix(state=job["state"], loss=f"{job['loss']:.4f}")
    except KeyboardInterrupt:
        server.call("DELETE", f"/admin/jobs/{job['id']}")
        raise RemoteError(f"interrupted: job {job['id']} cancelled, nothing deployed") from None
    finally:
        bar.close()
    if job["state"] != "done":
        raise RemoteError(f"job {job['id']} {job['state']}: {job['error']}")
    return job


def _message(error: urllib.error.HTTPError) -> str:
    """The error body's message (the API's {"error": {"message"}}), else the HTTP reason."""
    try:
        return json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return str(error.reason)
