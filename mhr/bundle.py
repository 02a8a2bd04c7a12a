"""The bundle: the one artifact between training and serving (skill inventory, routing table, task LoRAs).

On disk a bundle is a directory (specified exactly in docs/bundle-format.md); each tensor file is stored
under its name with the first 16 hex digits of its sha256 inserted, e.g. inventory.0123456789abcdef.safetensors:

    manifest.json           format version, backbone, MHRConfig, modules, tasks, file checksums
    inventory               "<module>.lora_A" [K, h, d_in/h, r], "<module>.lora_B" [K, h, r, d_out/h]
    routing                 "<module>" logits [T_routed, h, K], rows in manifest order of routed tasks
    adapters/<task>         "<module>.lora_A" [d_in, r], "<module>.lora_B" [r, d_out]  (dense tasks)
    zero_shot               same layout as a dense task: the trained MHR-mu adapter (optional)

`Bundle` holds all of it in memory; tasks are added, replaced, renamed and removed with method calls and
written back with `save`, which replaces files atomically and commits by writing the manifest last.
Validation of what is read lives in `mhr.bundle_check`.
"""

from __future__ import annotations

import enum
import fcntl
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mhr.adapter import LoRA
from mhr.bundle_check import (
    FORMAT_VERSION,
    STORED_NAME,
    BundleError,
    check_dense_lora,
    check_manifest,
    check_scale,
    check_standard_json,
    check_task_name,
    checked_routing_row,
    read_checked,
    stored_name,
)
from mhr.config import MHRConfig
from mhr.files import safetensors_bytes, sha256, write_atomic
from mhr.inject import mhr_layers
from mhr.materialize import SkillInventory

MANIFEST = "manifest.json"
INVENTORY = "inventory.safetensors"
ROUTING = "routing.safetensors"
ZERO_SHOT = "zero_shot.safetensors"
LOCK = ".lock"


class TaskKind(enum.Enum):
    ROUTED = "routed"  # a row of the routing table: materialized from the inventory
    DENSE = "dense"    # its own ordinary LoRA in adapters/<task>.safetensors


@dataclass
class Task:
    name: str
    kind: TaskKind
    alpha: float | None = None          # dense tasks: the LoRA's alpha
    metadata: dict[str, Any] = field(default_factory=dict)


def adapter_file(task: str) -> str:
    return f"adapters/{task}.safetensors"


def backbone_fingerprint(model: nn.Module) -> str:
    """A hash of the model type and every base parameter's name and shape (dtype and values excluded).

    MHR layers, if injected, are looked through: the fingerprint is that of the bare backbone.
    """
    wrapped = {f"{name}.base.": f"{name}." for name in mhr_layers(model)}
    adapter_params = {id(p) for layer in mhr_layers(model).values()
                      for n, p in layer.named_parameters() if not n.startswith("base.")}
    shapes = []
    for name, p in model.named_parameters():
        if id(p) in adapter_params:
            continue
        for prefix, original in wrapped.items():
            if name.startswith(prefix):
                name = original + name[len(prefix):]
                break
        shapes.append((name, list(p.shape)))
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return sha256(json.dumps([model_type, sorted(shapes)]).encode())


@dataclass
class Bundle:
    """A skill inventory with its routing table, dense task adapters and zero-shot adapter.

    Change the tasks through the methods below (add, remove, rename): they keep the name lookups, which
    make finding one task among 100 000 a dict access, in step with `tasks` and `routing`.
    """

    config: MHRConfig
    backbone: str                                  # name or path the backbone loads from
    fingerprint: str                               # backbone_fingerprint of that model
    modules: dict[str, tuple[int, int]]            # module name -> (d_in, d_out), model order
    lora_A: dict[str, Tensor]                      # [K, h, d_in/h, r]
    lora_B: dict[str, Tensor]                      # [K, h, r, d_out/h]
    tasks: list[Task] = field(default_factory=list)
    routing: dict[str, Tensor] = field(default_factory=dict)   # [T_routed, h, K] logits (views of one table)
    adapters: dict[str, LoRA] = field(default_factory=dict)    # dense tasks by name
    zero_shot: LoRA | None = None
    training: dict[str, Any] = field(default_factory=dict)
    revision: int = 0                              # bumped by every save; guards concurrent writers
    # name -> task, name -> routing row; built on first lookup, extended by an add, dropped by other changes
    _lookup: tuple[dict[str, Task], dict[str, int]] | None = field(default=None, init=False, repr=False,
                                                                   compare=False)
    # every routed task's logits [T_routed, M, h, K], modules in `modules` order; `routing` holds its views.
    # It is the first rows of `_routing_rows`, which has room for more: adding a task writes the row past
    # the table (the table is copied only when the room runs out, into a quarter more), so adding costs the
    # same at 100 000 tasks as at 10, and rows once handed out never change; removing a task copies the
    # others into new storage.
    _routing_table: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _routing_rows: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.routing:
            if set(self.routing) != set(self.modules):
                raise BundleError(f"routing logits name modules {sorted(self.routing)}, the bundle has "
                                  f"{sorted(self.modules)}: give one [T_routed, h, K] tensor per module")
            table = torch.stack([self.routing[m] for m in self.modules], dim=1)
            self._set_routing(table, len(table))

    def _set_routing(self, rows: Tensor | None, n: int) -> None:
        """Hold the first `n` of `rows` [capacity, M, h, K] as the routing table (n = 0: no routed task) and
        expose it per module as `routing`."""
        self._routing_rows, self._routing_table = (rows, rows[:n]) if n else (None, None)
        self.routing = {m: rows[:n, i] for i, m in enumerate(self.modules)} if n else {}

    # ----- building -------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, config: MHRConfig, backbone: str, tasks: list[str],
                   training: dict[str, Any] | None = None) -> Bundle:
        """A bundle of an injected model's inventory; every router row becomes a routed task, in order."""
        layers = mhr_layers(model)
        if not layers:
            raise BundleError("model holds no MHR layers: inject them before building a bundle")
        n_rows = {layer.router.n_tasks for layer in layers.values()}
        if n_rows != {len(tasks)}:
            raise BundleError(f"{len(tasks)} task name(s) for routers with {sorted(n_rows)} rows")
        bundle = cls(
            config=config, backbone=backbone, fingerprint=backbone_fingerprint(model),
            modules={n: (layer.in_features, layer.out_features) for n, layer in layers.items()},
            lora_A={n: layer.lora_A.detach().cpu().clone() for n, layer in layers.items()},
            lora_B={n: layer.lora_B.detach().cpu().clone() for n, layer in layers.items()},
            training=dict(training or {}),
        )
        for i, name in enumerate(tasks):
            bundle.add_routed_task(name, {n: layer.router.logits[i] for n, layer in layers.items()})
        return bundle

    def inventory(self, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> SkillInventory:
        return SkillInventory(self.lora_A, self.lora_B, self.config.alpha, device=device, dtype=dtype)

    # ----- tasks ----------------------------------------------------------------------------------

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        task = self._tasks_by_name().get(name)
        if task is None:
            raise KeyError(f"task {name!r} is not in this bundle (tasks: {listed(self.task_names)})")
        return task

    def _tasks_by_name(self) -> dict[str, Task]:
        return self._lookups()[0]

    def _rows_by_name(self) -> dict[str, int]:
        return self._lookups()[1]

    def _lookups(self) -> tuple[dict[str, Task], dict[str, int]]:
        if self._lookup is None:
            self._lookup = ({t.name: t for t in self.tasks}, {n: i for i, n in enumerate(self.routed_tasks())})
        return self._lookup

    def _add_lookup(self, task: Task, row: int | None) -> None:
        """Record an appended task in the lookups, if built (kept up to date: rebuilding them is O(T))."""
        if self._lookup is not None:
            by_name, rows = self._lookup
            by_name[task.name] = task
            if row is not None:
                rows[task.name] = row

    def routed_tasks(self) -> list[str]:
        """Names of routed tasks, in routing-table row order."""
        return [t.name for t in self.tasks if t.kind is TaskKind.ROUTED]

    def add_routed_task(self, name: str, logits: Mapping[str, Tensor], *, replace: bool = False,
                        metadata: dict[str, Any] | None = None) -> None:
        """Add (or, with `replace`, overwrite) a task given by routing logits [h, K] per module."""
        self._check_new_name(name, replace)
        row = checked_routing_row(logits, list(self.modules), self.config, where=f"routing logits of task {name!r}")
        extra = sorted(set(logits) - set(self.modules))
        if extra:
            raise BundleError(f"routing logits of task {name!r} name modules not in the bundle: {extra}")
        if name in self._tasks_by_name():
            self.remove_task(name)
        n, rows = (0 if self._routing_table is None else len(self._routing_table)), self._routing_rows
        if rows is None or n == len(rows):  # full: new storage with a quarter more room
            grown = torch.empty(n + n // 4 + 8, len(self.modules), self.config.n_heads, self.config.n_skills,
                                dtype=torch.float32 if rows is None else rows.dtype)
            if n:
                grown[:n] = self._routing_table
            rows = grown
        rows[n] = row  # a copy: no row aliases the caller's tensor (a router still training)
        self._set_routing(rows, n + 1)
        task = Task(name, TaskKind.ROUTED, metadata=dict(metadata or {}))
        self.tasks.append(task)
        self._add_lookup(task, n)

    def add_dense_task(self, name: str, lora: LoRA, *, replace: bool = False,
                       metadata: dict[str, Any] | None = None) -> None:
        """Add (or, with `replace`, overwrite) a task given as an ordinary LoRA over some of the modules."""
        self._check_new_name(name, replace)
        check_dense_lora(lora, self.modules, where=f"LoRA of task {name!r}")
        if name in self._tasks_by_name():
            self.remove_task(name)
        self.adapters[name] = _stored_copy(lora, self.modules)
        task = Task(name, TaskKind.DENSE, alpha=float(lora.alpha), metadata=dict(metadata or {}))
        self.tasks.append(task)
        self._add_lookup(task, None)

    def set_zero_shot(self, lora: LoRA | None) -> None:
        """Store the trained MHR-mu adapter (None: fall back to the plain average of the skills)."""
        if lora is not None:
            check_dense_lora(lora, self.modules, where="zero-shot LoRA")
            lora = _stored_copy(lora, self.modules)
        self.zero_shot = lora

    def remove_task(self, name: str) -> None:
        task = self.task(name)
        if task.kind is TaskKind.ROUTED:
            i, table = self._rows_by_name()[name], self._routing_table
            rows = torch.empty_like(self._routing_rows)
            rows[:i], rows[i:len(table) - 1] = table[:i], table[i + 1:]
            self._set_routing(rows, len(table) - 1)
        else:
            del self.adapters[name]
        self.tasks.remove(task)
        self._lookup = None

    def rename_task(self, old: str, new: str) -> None:
        task = self.task(old)
        self._check_new_name(new, replace=False)
        task.name = new
        if task.kind is TaskKind.DENSE:
            self.adapters[new] = self.adapters.pop(old)
        self._lookup = None

    def _check_new_name(self, name: str, replace: bool) -> None:
        check_task_name(name, where="task name")
        if not replace and name in self._tasks_by_name():
            raise BundleError(f"task {name!r} already exists: remove it first or pass replace=True")

    # ----- adapters -------------------------------------------------------------------------------

    def routing_logits(self, name: str) -> dict[str, Tensor]:
        """A routed task's logits [h, K] per module."""
        return dict(zip(self.modules, self.routing_row(name), strict=True))

    def routing_row(self, name: str) -> Tensor:
        """A routed task's logits of every module at once, [M, h, K] in `modules` order (a view: one lookup)."""
        if self.task(name).kind is not TaskKind.ROUTED:
            raise BundleError(f"task {name!r} is a dense task: it has no routing logits")
        return self._routing_table[self._rows_by_name()[name]]

    def task_lora(self, name: str, inventory: SkillInventory | None = None) -> LoRA:
        """The ordinary LoRA serving `name`: materialized from routing (eval weights) or the dense one."""
        if self.task(name).kind is TaskKind.DENSE:
            return self.adapters[name]
        return (inventory or self.inventory()).materialize_logits(self.routing_logits(name))

    def zero_shot_lora(self, inventory: SkillInventory | None = None) -> LoRA:
        """The adapter for tasks without routing: the trained MHR-mu adapter, else the skills' average."""
        return self.zero_shot if self.zero_shot is not None else (inventory or self.inventory()).average()

    def check_backbone(self, model: nn.Module) -> None:
        """Refuse a model whose architecture differs from the one the bundle was trained on."""
        found = backbone_fingerprint(model)
        if found != self.fingerprint:
            raise BundleError(
                f"backbone mismatch: the bundle was trained on {self.backbone!r} (fingerprint "
                f"{self.fingerprint[:16]}…), the given model has fingerprint {found[:16]}…: "
                "load the backbone the bundle names"
            )

    # ----- disk -----------------------------------------------------------------------------------

    def _files(self) -> dict[str, bytes]:
        files = {INVENTORY: safetensors_bytes(
            {f"{m}.lora_{ab}": t[m] for m in self.modules for ab, t in (("A", self.lora_A), ("B", self.lora_B))})}
        if self.routing:
            files[ROUTING] = safetensors_bytes(self.routing)
        for name, lora in self.adapters.items():
            files[adapter_file(name)] = _lora_bytes(lora)
        if self.zero_shot is not None:
            files[ZERO_SHOT] = _lora_bytes(self.zero_shot)
        return files

    def _manifest(self, checksums: dict[str, str], revision: int) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "revision": revision,
            "backbone": {"name_or_path": self.backbone, "fingerprint": self.fingerprint},
            "config": self.config.to_dict(),
            "modules": {m: list(dims) for m, dims in self.modules.items()},
            "tasks": [_task_entry(t) for t in self.tasks],
            "zero_shot": None if self.zero_shot is None else {"alpha": float(self.zero_shot.alpha)},
            "training": self.training,
            "files": checksums,
        }

    def save(self, path: str | Path) -> None:
        """Write the bundle to directory `path` (created if needed).

        Tensor files are named by their content hash (see `stored_name`), so a changed file is a new
        file: the new files are written first, the manifest (listing them) is replaced atomically and
        commits the change, then files no longer listed are deleted. A crash at any point leaves the old
        or the new bundle complete. Refuses to overwrite a bundle saved by someone else since this copy
        was loaded (its revision moved on).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path, exclusive=True):
            on_disk = _read_manifest_if_any(path)
            if on_disk is not None and on_disk.get("revision") != self.revision:
                raise BundleError(
                    f"{path / MANIFEST}: the bundle on disk is at revision {on_disk.get('revision')}, this copy "
                    f"was loaded at revision {self.revision}: load it again and redo the change")
            files = self._files()
            checksums = {rel: sha256(data) for rel, data in files.items()}
            # Checked and serialized before anything is written: metadata that is not JSON, or a number
            # JSON cannot hold (NaN, Infinity: refused by allow_nan=False), fails the save cleanly.
            fields = self._manifest(checksums, self.revision + 1)
            check_scale(self.config.alpha, self.config.rank, path / MANIFEST, "config.alpha")
            try:
                manifest = json.dumps(fields, indent=2, allow_nan=False) + "\n"
            except ValueError:
                check_standard_json(fields, path / MANIFEST)  # names the field, if a number was the cause
                raise
            for rel, data in files.items():
                target = path / stored_name(rel, checksums[rel])
                if not target.is_file():
                    write_atomic(target, data)
            write_atomic(path / MANIFEST, manifest.encode())
            self.revision += 1  # only once committed: a failed save can be retried from this copy
            keep = {path / stored_name(rel, digest) for rel, digest in checksums.items()}
            for stale in [*path.glob("*.safetensors"), *path.glob("adapters/*.safetensors")]:
                if stale not in keep and STORED_NAME.fullmatch(stale.name):
                    stale.unlink()

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> Bundle:
        """Read and validate the bundle in directory `path`; with `model`, also check its backbone.

        Raises BundleError naming the file and the field or tensor for anything missing or wrong.
        """
        path = Path(path)
        with _locked(path, exclusive=False):
            manifest = check_manifest(path / MANIFEST)
            config = MHRConfig.from_dict(manifest["config"])
            modules = {m: tuple(d) for m, d in manifest["modules"].items()}
            tasks = [Task(t["name"], TaskKind(t["kind"]), t.get("alpha"), t.get("metadata", {}))
                     for t in manifest["tasks"]]
            read = read_checked(path, manifest, config, modules, tasks)
        bundle = cls(config=config, backbone=manifest["backbone"]["name_or_path"],
                     fingerprint=manifest["backbone"]["fingerprint"], modules=modules,
                     lora_A=read.lora_A, lora_B=read.lora_B, tasks=tasks, routing=read.routing,
                     adapters=read.adapters, zero_shot=read.zero_shot, training=manifest["training"],
                     revision=manifest["revision"])
        if model is not None:
            bundle.check_backbone(model)
        return bundle


def listed(names: list[str], limit: int = 20) -> str:
    """Names for an error message: all of a few, the first `limit` of many."""
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _stored_copy(lora: LoRA, modules: Mapping[str, tuple[int, int]]) -> LoRA:
    """A CPU copy of `lora` (never an alias of the caller's tensors) with its modules in bundle order,
    the order `Bundle.load` reads them back in: a round trip gives the same LoRA, module order included."""
    names = [m for m in modules if m in lora.A]
    return LoRA({m: lora.A[m].to("cpu", copy=True) for m in names},
                {m: lora.B[m].to("cpu", copy=True) for m in names}, lora.alpha)


def _lora_bytes(lora: LoRA) -> bytes:
    return safetensors_bytes({f"{m}.lora_{ab}": t[m] for m in lora.modules
                              for ab, t in (("A", lora.A), ("B", lora.B))})


def _task_entry(task: Task) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": task.name, "kind": task.kind.value}
    if task.alpha is not None:
        entry["alpha"] = task.alpha
    entry["metadata"] = task.metadata
    return entry


def _read_manifest_if_any(path: Path) -> dict[str, Any] | None:
    if not (path / MANIFEST).exists():
        return None
    return check_manifest(path / MANIFEST)


@contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[None]:
    """An advisory lock on the bundle directory: readers never see a half-applied save.

    Readers of a read-only directory (a mounted volume) go without the lock; the manifest's checksums
    still catch a torn read.
    """
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found")
    try:
        lock = open(path / LOCK, "a+")
    except OSError:
        if exclusive:
            raise
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
