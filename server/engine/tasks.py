"""Which adapter serves a task name: the bundle's tasks under versioned keys, and the zero-shot policy.

Owns the live bundle (tasks are added, replaced and removed while requests run) and turning a key into
the adapter to write into a slot: mixed from the skill inventory resident on the serving device
(`server.engine.inventory`), or the task's dense LoRA. Every change of a task gives it a new key, so the adapter
cache never mixes a task's old and new weights: requests running on the old key finish on it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mhr.adapter import LoRA
from mhr.bundle import Bundle, TaskKind, listed
from mhr.functional import routing_weights
from server.engine.inventory import MixedLoRA, ServingInventory
from server.model.layers import GroupedLoRA

MIXTURE_PREFIX = "mix-"     # results of per-request mixtures name their adapter "mix-<digest>"
MIXTURE_VERSION = 0
MAX_MIXTURES = 1024         # mixtures remembered for (re)loading into a slot; older ones are recomputed
ZERO_SHOT = "zero-shot"   # the name results give when the zero-shot adapter served a request
BASE = "base"             # the name results give when no adapter was asked for


class UnknownTask(LookupError):
    """A task the bundle does not hold, with zero-shot fallback turned off."""


class InvalidMixture(ValueError):
    """A per-request mixture that does not fit the bundle; `field` names what is wrong."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TaskSummary:
    """What a served task is: its kind ("routed" or "dense"), rank, metadata and, for a routed task, its per-head
    skill weights averaged over modules ([h][K])."""

    name: str
    kind: str
    rank: int
    metadata: Mapping
    routing: list[list[float]] | None


@dataclass(frozen=True, eq=False)
class Mixture:
    """A per-request mixture of skills: weights [h, K] per module (normalised per head), named by content.

    Equal weights give equal names, so a mixture is materialized once and then served from its slot.
    """

    name: str                      # "mix-" + a digest of the weights
    weights: Mapping[str, Tensor]

    @classmethod
    def of(cls, weights: Mapping[str, Tensor]) -> Mixture:
        digest = hashlib.sha256()
        for module in sorted(weights):
            digest.update(module.encode())
            digest.update(weights[module].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return cls(f"{MIXTURE_PREFIX}{digest.hexdigest()[:16]}", dict(weights))


@dataclass(frozen=True)
class AdapterKey:
    """A version of one adapter: `name` is a task name, ZERO_SHOT or a mixture's name; a new version is a
    new key. Task and zero-shot versions count from 1; a mixture's key has version MIXTURE_VERSION."""

    name: str
    version: int


class TaskRegistry:
    """The bundle being served, with a version per task.

    Args:
        bundle: the bundle (changed in place by add/replace/remove).
        inventory: the bundle's skills in slot layout, on the serving device.
        allow_zero_shot: serve unknown task names with the zero-shot adapter.
    """

    def __init__(self, bundle: Bundle, inventory: ServingInventory, allow_zero_shot: bool) -> None:
        self.allow_zero_shot = allow_zero_shot
        self._counter = itertools.count(MIXTURE_VERSION + 1)
        self._mixtures: OrderedDict[str, Mixture] = OrderedDict()
        self._keys: dict[str, AdapterKey] = {}
        self.zero_shot_key: AdapterKey | None = None
        self.replace_bundle(bundle, inventory)

    def replace_bundle(self, bundle: Bundle, inventory: ServingInventory) -> list[AdapterKey]:
        """Serve another bundle from now on; returns every key of the previous one (to invalidate).

        Versions keep counting across bundles, so no new key can equal a key still in a slot.
        """
        old = [*self._keys.values(), *([self.zero_shot_key] if self.zero_shot_key else [])]
        self.bundle, self.inventory = bundle, inventory
        self._keys = {name: AdapterKey(name, next(self._counter)) for name in bundle.task_names}
        self.zero_shot_key = AdapterKey(ZERO_SHOT, next(self._counter))
        return old

    @property
    def task_names(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def backbone(self) -> str:
        return self.bundle.backbone

    @property
    def zero_shot_source(self) -> str:
        """What the zero-shot adapter is: the candidate `mhr zeroshot` selected on validation data ("backbone",
        "average" or "trained", as the bundle records it), else "trained" for a stored adapter, "average"
        without one."""
        recorded = self.bundle.training.get("zero_shot")
        if isinstance(recorded, dict) and isinstance(recorded.get("selected"), str):
            return recorded["selected"]
        return "trained" if self.bundle.zero_shot is not None else "average"

    @property
    def routed_names(self) -> list[str]:
        """The served tasks given by routing (not by a LoRA of their own)."""
        return [t for t in self._keys if self.bundle.task(t).kind is TaskKind.ROUTED]

    def adapter_name(self, task: str) -> str:
        """The name of the adapter that would serve `task` now: the task, or ZERO_SHOT. Raises UnknownTask."""
        key = self.resolve(task)
        return ZERO_SHOT if key == self.zero_shot_key else key.name

    def summary(self, name: str) -> TaskSummary:
        """What the served task `name` is (KeyError if it is not served)."""
        task = self.bundle.task(name)
        if task.kind is TaskKind.ROUTED:
            weights = routing_weights(self.bundle.routing_row(name).float())   # [M, h, K]
            routing = weights.mean(dim=0).round(decimals=4).tolist()          # [h, K], averaged over modules
            return TaskSummary(name, "routed", self.bundle.config.rank, task.metadata, routing)
        return TaskSummary(name, "dense", self.bundle.adapters[name].rank, task.metadata, None)

    def uniform_mixture(self) -> Mixture:
        """The MHR-μ mixture as a per-request mixture: every head averages every skill."""
        config = self.bundle.config
        return self.mixture(skills=[[1.0] * config.n_skills] * config.n_heads)

    def mixture(self, shares: Mapping[str, float] | None = None,
                skills: list[list[float]] | None = None) -> Mixture:
        """A per-request mixture: routed tasks' routing weights averaged with `shares` (task -> weight), or
        per-head skill weights `skills` [h][K] used for every module. Raises InvalidMixture."""
        config, modules = self.bundle.config, self.bundle.modules
        h, K = config.n_heads, config.n_skills
        if skills is not None:
            weights = torch.tensor(skills) if {len(row) for row in skills} == {K} else None
            if weights is None or weights.shape != (h, K):
                raise InvalidMixture(f"mhr.skills must be {h} rows (heads) of {K} weights (skills)", "mhr.skills")
            return Mixture.of({m: weights / weights.sum(dim=-1, keepdim=True) for m in modules})
        total = sum(shares.values())
        mixed = {m: torch.zeros(h, K) for m in modules}
        for task, share in shares.items():
            if task not in self:
                raise InvalidMixture(f"mhr.mix: task {task!r} is not in the bundle", "mhr.mix")
            if self.bundle.task(task).kind is not TaskKind.ROUTED:
                raise InvalidMixture(f"mhr.mix: task {task!r} has its own LoRA, not routing: only routed tasks "
                                     "can be mixed", "mhr.mix")
            for m, logits in self.bundle.routing_logits(task).items():
                mixed[m] += routing_weights(logits.float()) * (share / total)
        return Mixture.of(mixed)

    def resolve(self, task: str | None, mixture: Mixture | None = None) -> AdapterKey | None:
        """The key serving `task` (or `mixture`, which takes precedence) now; None for no adapter (task None).
        Raises UnknownTask."""
        if mixture is not None:
            self._mixtures[mixture.name] = mixture
            self._mixtures.move_to_end(mixture.name)
            while len(self._mixtures) > MAX_MIXTURES:
                self._mixtures.popitem(last=False)
            return AdapterKey(mixture.name, MIXTURE_VERSION)
        if task is None:
            return None
        key = self._keys.get(task)
        if key is not None:
            return key
        if self.allow_zero_shot:
            return self.zero_shot_key
        raise UnknownTask(f"task {task!r} is not in the bundle and zero-shot serving is off "
                          f"(tasks: {listed(list(self._keys))})")

    def load(self, key: AdapterKey) -> GroupedLoRA | MixedLoRA:
        """The adapter of a current key, in slot layout."""
        if key.version == MIXTURE_VERSION:
            return self.inventory.weighted(self._mixtures[key.name].weights)
        if key == self.zero_shot_key:
            zero_shot = self.bundle.zero_shot
            return self.inventory.average() if zero_shot is None else self.inventory.dense(zero_shot)
        if self._keys.get(key.name) != key:
            raise KeyError(f"{key} is no longer served (the task was replaced or removed)")
        if self.bundle.task(key.name).kind is TaskKind.DENSE:
            return self.inventory.dense(self.bundle.adapters[key.name])
        return self.inventory.routed(self.bundle.routing_row(key.name))

    def put_routed(self, name: str, logits: Mapping[str, Tensor]) -> AdapterKey | None:
        """Add or replace a routed task (logits [h, K] per module); returns the replaced key, if any."""
        self.bundle.add_routed_task(name, logits, replace=True)
        return self._bump(name)

    def put_dense(self, name: str, lora: LoRA) -> AdapterKey | None:
        """Add or replace a task given by its own LoRA; returns the replaced key, if any."""
        self.bundle.add_dense_task(name, lora, replace=True)
        return self._bump(name)

    def remove(self, name: str) -> AdapterKey:
        """Stop serving `name`; returns its key so the cache can free it."""
        self.bundle.remove_task(name)
        return self._keys.pop(name)

    def _bump(self, name: str) -> AdapterKey | None:
        old = self._keys.get(name)
        self._keys[name] = AdapterKey(name, next(self._counter))
        return old
