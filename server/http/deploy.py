"""Hot deploys: the admin routes that add, replace or remove a task (from an upload, or routed from a few
examples without gradients: `server.engine.route_search`), or reload the whole bundle, live.

Every change is validated in full, written to the bundle on disk (atomically, by `mhr.Bundle.save`),
and only then applied to the running engine, so a failed upload changes nothing anywhere and a restart
serves what the running server served. Changes are serialized; requests keep running meanwhile:
requests already running on a replaced or removed task finish on its old weights; requests still
waiting for admission get whatever serves the name when they are admitted (the new weights, or, for a
removed task, the zero-shot adapter, or a 503 when zero-shot serving is off). Upload formats are
those of `server.http.uploads`.

Each change starts from the bundle on disk, so it keeps what other replicas wrote there; the engine
serves those other changes after POST /admin/reload.

Error bodies name a bundle's files relative to the bundle directory ("manifest.json: ..."): where the
bundle lives on the server is none of a client's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Request

import mhr
from mhr.bundle_check import check_task_name
from server.engine.contract import ServingEngine
from server.engine.requests import InvalidRequest
from server.engine.route_search import RouteSearch
from server.engine.tasks import BASE, MIXTURE_PREFIX, ZERO_SHOT
from server.http.admin_protocol import RouteRequest, RouteResponse
from server.http.errors import APIError
from server.http.uploads import Upload, parse_upload
from training.data import Example

RESERVED = (ZERO_SHOT, BASE)  # adapter names responses use; a task under one would be ambiguous


class Deployer:
    """Applies admin changes to the bundle directory `bundle_dir` and to `engine`.

    Args:
        engine: the engine serving the bundle.
        bundle_dir: the bundle directory the engine was loaded from.
        max_upload_bytes: bound of an upload's body, and of what an uploaded archive unpacks to (413).
    """

    def __init__(self, engine: ServingEngine, bundle_dir: str | Path, max_upload_bytes: int) -> None:
        self.engine, self.bundle_dir, self.max_upload_bytes = engine, Path(bundle_dir), max_upload_bytes
        self._lock = asyncio.Lock()
        self._searching = False  # one routing search at a time: each scores dozens of batches on the engine

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/admin")  # keys are checked before any body is read: `server.http.guard`

        @router.post("/tasks/{task}", status_code=201)
        async def create(task: str, request: Request, alpha: float | None = None) -> dict:
            return await self.put(task, await self._body(task, request), _content_type(request), alpha,
                                  replace=False)

        @router.put("/tasks/{task}")
        async def replace(task: str, request: Request, alpha: float | None = None) -> dict:
            return await self.put(task, await self._body(task, request), _content_type(request), alpha,
                                  replace=True)

        @router.post("/tasks/{task}/route", status_code=201)
        async def route(task: str, body: RouteRequest) -> RouteResponse:
            return await self.route(task, body)

        @router.delete("/tasks/{task}")
        async def delete(task: str) -> dict:
            return await self.delete(task)

        @router.post("/reload")
        async def reload() -> dict:
            return await self.reload()

        return router

    async def _body(self, task: str, request: Request) -> bytes:
        check_name(task)  # before reading a body that would be refused anyway
        limit = self.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"upload of {declared} bytes is larger than {limit} bytes", code="upload_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise APIError(413, f"upload larger than {limit} bytes", code="upload_too_large")
        if not data:
            raise APIError(400, "empty upload: send the task's safetensors file or PEFT archive as the body",
                           param="body")
        return bytes(data)

    # ----- operations -------------------------------------------------------------------------------

    async def put(self, task: str, body: bytes, content_type: str, alpha: float | None, replace: bool) -> dict:
        """Add (`replace` False: 409 if the name is taken) or add-or-replace a task from an upload."""
        check_name(task)
        upload = await asyncio.to_thread(parse_upload, body, content_type, alpha, self.max_upload_bytes)
        max_rank = self.engine.max_rank
        if upload.lora is not None and upload.lora.rank > max_rank:
            raise APIError(400, f"LoRA rank {upload.lora.rank} exceeds the server's slot rank {max_rank}: "
                                "restart with a larger --max-rank", param="body")
        exists, revision = await self.deploy(task, upload, replace, {"deployed": "admin"})
        return {"task": task, "kind": "routed" if upload.logits is not None else "dense",
                "replaced": exists, "revision": revision}

    async def route(self, task: str, body: RouteRequest) -> RouteResponse:
        """A new routed task from examples, chosen without gradients (`server.engine.route_search`), deployed as
        a PUT of its logits would be."""
        check_name(task)
        if not body.replace and task in self.engine.tasks:
            raise APIError(409, f"task {task!r} already exists: send \"replace\": true to replace it",
                           code="task_exists")
        if self._searching:
            raise APIError(429, "a routing search is running: retry when it ends", type="rate_limit_error",
                           code="search_running", headers={"Retry-After": "2"})
        self._searching = True
        try:
            return await self._route(task, body)
        finally:
            self._searching = False

    async def _route(self, task: str, body: RouteRequest) -> RouteResponse:
        examples = [Example(task, e.input, e.output) for e in body.examples]
        search = await asyncio.to_thread(RouteSearch, self.engine, examples, body.budget)  # tokenizes
        limit = self.engine.config.max_seq_len
        for i, (ids, _) in enumerate(search.encoded):
            if len(ids) > limit:
                raise APIError(400, f"example {i} has {len(ids)} tokens with its answer; the context limit is "
                                    f"{limit}", param=f"examples.{i}", code="context_length_exceeded")
        try:
            found = await search.run(task)
        except InvalidRequest as e:  # an engine that cannot score prompts (vLLM)
            raise APIError(400, f"this engine cannot score examples: {e}", code="not_supported") from None
        metadata = {"deployed": "route", "mixture": found.mixture, "loss": round(found.loss_after, 6),
                    "examples": len(examples)}
        exists, revision = await self.deploy(task, Upload(logits=found.logits), body.replace, metadata)
        return RouteResponse(task=task, replaced=exists, revision=revision, mixture=found.mixture,
                             loss_before=found.loss_before, loss_after=found.loss_after,
                             evaluations=found.evaluations, seconds=round(found.seconds, 3))

    async def deploy(self, task: str, upload: Upload, replace: bool, metadata: dict) -> tuple[bool, int]:
        """Write the task to the bundle on disk, then serve it; returns (it replaced a task, the revision)."""
        async with self._lock:
            exists = task in self.engine.tasks

            def change(bundle: mhr.Bundle) -> bool:
                if not replace and (exists or task in bundle.task_names):
                    raise APIError(409, f"task {task!r} already exists: use PUT to replace it", code="task_exists")
                _apply(bundle, task, upload, metadata)
                return True

            revision = await asyncio.to_thread(self._persist, change)
            await asyncio.to_thread(self.engine.put_task, task, logits=upload.logits, lora=upload.lora)
        return exists, revision

    async def delete(self, task: str) -> dict:
        """Remove a task from the bundle on disk and stop serving it (404 if the engine does not serve it)."""
        check_name(task)
        async with self._lock:
            if task not in self.engine.tasks:
                raise APIError(404, f"task {task!r} is not in the bundle", param="task", code="task_not_found")

            def change(bundle: mhr.Bundle) -> bool:
                if task not in bundle.task_names:  # already removed on disk (another replica)
                    return False
                bundle.remove_task(task)
                return True

            revision = await asyncio.to_thread(self._persist, change)
            await asyncio.to_thread(self.engine.remove_task, task)
        return {"task": task, "deleted": True, "revision": revision}

    async def reload(self) -> dict:
        """Serve the bundle now on disk; a bundle that fails validation is refused and the old one serves."""
        async with self._lock:
            try:
                bundle = await asyncio.to_thread(mhr.Bundle.load, self.bundle_dir)
                await asyncio.to_thread(self.engine.replace_bundle, bundle)
            except (mhr.BundleError, mhr.ConfigError, ValueError) as e:
                raise APIError(400, f"reload refused, the current bundle keeps serving: {self.relative(e)}",
                               code="invalid_bundle") from None
            except OSError as e:
                raise self._disk_error("reload failed, the current bundle keeps serving", e) from None
        return {"tasks": bundle.task_names, "revision": bundle.revision}

    def _persist(self, change: Callable[[mhr.Bundle], bool]) -> int:
        """Load the bundle on disk, apply `change` (False: nothing to write), save it (validated, atomic);
        refuse on any error. Returns the bundle's revision on disk afterwards."""
        try:
            bundle = mhr.Bundle.load(self.bundle_dir)
            if change(bundle):
                bundle.save(self.bundle_dir)
        except (mhr.BundleError, mhr.ConfigError, KeyError, ValueError) as e:
            raise APIError(400, f"change refused, nothing was modified: {self.relative(e)}",
                           code="invalid_adapter") from None
        except OSError as e:  # a save that failed part way left the old bundle complete (see Bundle.save)
            raise self._disk_error("change failed, the bundle on disk is unchanged", e) from None
        return bundle.revision

    def relative(self, text: object) -> str:
        """`text` (an error, a path) with paths inside the bundle directory made relative to it."""
        text = str(text)
        for root in {str(self.bundle_dir), str(self.bundle_dir.resolve())}:
            text = text.replace(root + "/", "").replace(root, "the bundle directory")
        return text

    def _disk_error(self, what: str, error: OSError) -> APIError:
        """A 500 for a bundle directory the server cannot read or write, naming no absolute path."""
        detail = error.strerror or type(error).__name__
        if error.filename is not None:
            detail += f": {self.relative(error.filename)}"
        return APIError(500, f"{what}: {detail}", type="server_error", code="bundle_io_error")


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "")


def check_name(task: str) -> None:
    """A 400 unless `task` is a valid task name that no adapter name of the responses uses."""
    try:
        check_task_name(task, where="task")
    except mhr.BundleError as e:
        raise APIError(400, str(e), param="task", code="invalid_task_name") from None
    if task in RESERVED or task.startswith(MIXTURE_PREFIX):
        raise APIError(400, f"task name {task!r} is reserved (responses use {ZERO_SHOT!r}, {BASE!r} and "
                            f"'{MIXTURE_PREFIX}…' to name adapters): choose another name", param="task",
                       code="invalid_task_name")


def _apply(bundle: mhr.Bundle, task: str, upload: Upload, metadata: dict) -> None:
    if upload.logits is not None:
        bundle.add_routed_task(task, upload.logits, replace=True, metadata=metadata)
    else:
        bundle.add_dense_task(task, upload.lora, replace=True, metadata=metadata)
