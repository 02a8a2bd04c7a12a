"""Hot deploys: the admin routes that add, replace or remove a task, or reload the whole bundle, live.

Every change is validated in full, written to the bundle on disk (atomically, by `mhr.Bundle.save`),
and only then applied to the running engine, so a failed upload changes nothing anywhere and a restart
serves what the running server served. Changes are serialized; requests keep running meanwhile
(a replaced task's running requests finish on its old weights).

Uploads (request body, at most `max_upload_bytes`):
  * safetensors with one tensor per module named `<module>`, logits [h, K]: a routed task;
  * safetensors with `<module>.lora_A` [d_in, r] / `<module>.lora_B` [r, d_out]: a dense task
    (query parameter `alpha`, default r);
  * a .tar, .tar.gz or .zip of a PEFT LoRA directory (adapter_config.json, adapter_model.safetensors).
"""

from __future__ import annotations

import asyncio
import io
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from torch import Tensor

import mhr
from mhr.bundle_check import check_task_name
from mhr.export_peft import CONFIG_FILE, WEIGHTS_FILE
from mhr.files import FileFormatError, parse_safetensors
from server.engine import Engine
from server.serving import APIError

PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE)


@dataclass
class Upload:
    """A parsed upload: routing logits per module, or a LoRA (exactly one)."""

    logits: dict[str, Tensor] | None = None
    lora: mhr.LoRA | None = None


class Deployer:
    """Applies admin changes to the bundle directory `bundle_dir` and to `engine`."""

    def __init__(self, engine: Engine, bundle_dir: str | Path, max_upload_bytes: int = 64 << 20) -> None:
        self.engine, self.bundle_dir, self.max_upload_bytes = engine, Path(bundle_dir), max_upload_bytes
        self._lock = asyncio.Lock()

    def router(self, guard) -> APIRouter:
        router = APIRouter(prefix="/admin", dependencies=[guard])

        @router.post("/tasks/{task}", status_code=201)
        async def create(task: str, request: Request, alpha: float | None = None) -> dict:
            return await self.put(task, await self._body(request), request.headers.get("content-type", ""),
                                  alpha, replace=False)

        @router.put("/tasks/{task}")
        async def replace(task: str, request: Request, alpha: float | None = None) -> dict:
            return await self.put(task, await self._body(request), request.headers.get("content-type", ""),
                                  alpha, replace=True)

        @router.delete("/tasks/{task}")
        async def delete(task: str) -> dict:
            return await self.delete(task)

        @router.post("/reload")
        async def reload() -> dict:
            return await self.reload()

        return router

    async def _body(self, request: Request) -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_upload_bytes:
                raise APIError(413, f"upload larger than {self.max_upload_bytes} bytes", code="upload_too_large")
        if not data:
            raise APIError(400, "empty upload: send the task's safetensors file or PEFT archive as the body")
        return bytes(data)

    # ----- operations -------------------------------------------------------------------------------

    async def put(self, task: str, body: bytes, content_type: str, alpha: float | None, replace: bool) -> dict:
        _check_name(task)
        upload = parse_upload(body, content_type, alpha)
        if upload.lora is not None and upload.lora.rank > self.engine.slots.max_rank:
            raise APIError(400, f"LoRA rank {upload.lora.rank} exceeds the server's slot rank "
                                f"{self.engine.slots.max_rank}: restart with a larger --max-rank", param="body")
        async with self._lock:
            exists = task in self.engine.tasks.task_names
            if exists and not replace:
                raise APIError(409, f"task {task!r} already exists: use PUT to replace it", code="task_exists")
            await asyncio.to_thread(self._persist, lambda b: _apply(b, task, upload))
            self.engine.put_task(task, logits=upload.logits, lora=upload.lora)
        return {"task": task, "kind": "routed" if upload.logits is not None else "dense",
                "replaced": exists}

    async def delete(self, task: str) -> dict:
        _check_name(task)
        async with self._lock:
            if task not in self.engine.tasks.task_names:
                raise APIError(404, f"task {task!r} is not in the bundle", code="task_not_found")
            await asyncio.to_thread(self._persist, lambda b: b.remove_task(task))
            self.engine.remove_task(task)
        return {"task": task, "deleted": True}

    async def reload(self) -> dict:
        async with self._lock:
            try:
                bundle = await asyncio.to_thread(mhr.Bundle.load, self.bundle_dir)
                self.engine.replace_bundle(bundle)
            except (mhr.BundleError, mhr.ConfigError, ValueError) as e:
                raise APIError(400, f"reload refused, the current bundle keeps serving: {e}",
                               code="invalid_bundle") from None
        return {"tasks": len(bundle.tasks), "revision": bundle.revision}

    def _persist(self, change) -> None:
        """Load the bundle on disk, apply `change`, save it (validated, atomic); refuse on any error."""
        try:
            bundle = mhr.Bundle.load(self.bundle_dir)
            change(bundle)
            bundle.save(self.bundle_dir)
        except (mhr.BundleError, KeyError, ValueError) as e:
            raise APIError(400, f"change refused, nothing was modified: {e}", code="invalid_adapter") from None


def _check_name(task: str) -> None:
    try:
        check_task_name(task, where="task")
    except mhr.BundleError as e:
        raise APIError(400, str(e), param="task", code="invalid_task_name") from None


def _apply(bundle: mhr.Bundle, task: str, upload: Upload) -> None:
    if upload.logits is not None:
        bundle.add_routed_task(task, upload.logits, replace=True, metadata={"deployed": "admin"})
    else:
        bundle.add_dense_task(task, upload.lora, replace=True, metadata={"deployed": "admin"})


def parse_upload(body: bytes, content_type: str, alpha: float | None) -> Upload:
    """Routing logits or a LoRA from an upload (see the module docstring for the formats)."""
    if _is_archive(body):
        return Upload(lora=_peft_archive(body))
    try:
        tensors = parse_safetensors(body, Path("upload"))
    except FileFormatError as e:
        raise APIError(400, f"{e}: send a safetensors file, or a .tar/.tar.gz/.zip of a PEFT LoRA directory "
                            f"(content type was {content_type or 'not set'})", param="body") from None
    if all(k.endswith((".lora_A", ".lora_B")) for k in tensors):
        names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
        missing = [f"{n}.lora_{ab}" for n in names for ab in "AB" if f"{n}.lora_{ab}" not in tensors]
        if missing:
            raise APIError(400, f"upload: missing tensors {missing[:4]}", param="body")
        try:
            lora = mhr.LoRA({n: tensors[f"{n}.lora_A"] for n in names}, {n: tensors[f"{n}.lora_B"] for n in names},
                            alpha=1.0)
        except ValueError as e:
            raise APIError(400, f"upload: {e}", param="body") from None
        if alpha is not None and not alpha > 0:
            raise APIError(400, f"alpha must be > 0, got {alpha}", param="alpha")
        return Upload(lora=mhr.LoRA(lora.A, lora.B, alpha=float(alpha if alpha is not None else lora.rank)))
    if alpha is not None:
        raise APIError(400, "alpha applies to dense LoRA uploads only, not routing logits", param="alpha")
    return Upload(logits=tensors)


def _is_archive(body: bytes) -> bool:
    return body[:2] == b"\x1f\x8b" or body[:4] == b"PK\x03\x04" or body[257:262] == b"ustar"


def _peft_archive(body: bytes) -> mhr.LoRA:
    """Import a PEFT LoRA directory from an archive, reading only its two files (no paths are extracted)."""
    files: dict[str, bytes] = {}
    try:
        if body[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(body)) as z:
                for info in z.infolist():
                    if Path(info.filename).name in PEFT_FILES and not info.is_dir():
                        files[Path(info.filename).name] = z.read(info)
        else:
            with tarfile.open(fileobj=io.BytesIO(body)) as t:
                for member in t.getmembers():
                    if Path(member.name).name in PEFT_FILES and member.isfile():
                        files[Path(member.name).name] = t.extractfile(member).read()
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise APIError(400, f"upload: unreadable archive ({e})", param="body") from None
    missing = [f for f in PEFT_FILES if f not in files]
    if missing:
        raise APIError(400, f"upload: the archive lacks {missing}: archive a PEFT LoRA directory", param="body")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return mhr.import_peft(tmp)
        except mhr.PeftFormatError as e:
            raise APIError(400, f"upload: {e}".replace(tmp + "/", ""), param="body") from None
