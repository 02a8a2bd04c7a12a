"""MHRConfig: the shape and behaviour of a multi-head routed LoRA inventory.

The config describes the adapter architecture only (skills, heads, rank, targets, routing options).
The task list lives with the routing table (see `mhr.bundle`), because tasks come and go after training.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

INITS = ("mttl", "kaiming")


class ConfigError(ValueError):
    """An invalid MHRConfig; the message lists every problem found, one per line."""


@dataclass
class MHRConfig:
    """Configuration of an MHR (h > 1) or Polytropon (h = 1) skill inventory.

    Args:
        n_skills: K, the number of LoRA skills in the inventory.
        n_heads: h, the number of heads every skill is split into (1 = Polytropon). Each target's
            in_features and out_features must be divisible by h.
        rank: r, the LoRA rank of every skill.
        alpha: LoRA alpha; the adapter output is scaled by alpha / rank.
        dropout: dropout probability on the adapter input (training only).
        target_modules: which nn.Linear modules to adapt. A list of names matches a module whose
            full name equals an entry or ends with "." + entry; a single string is a regular
            expression that must match the full module name.
        relaxed_routing: in training, sample routing weights from a relaxed Bernoulli
            (Gumbel-sigmoid) of the logits; when False, use sigmoid(logits) in training too.
            Evaluation always uses sigmoid(logits).
        temperature: temperature of the relaxed Bernoulli.
        init: initialisation of the skills' A matrices: "mttl" (uniform, bound 1/sqrt(3 d_in)) or
            "kaiming" (kaiming-uniform per head block, as PEFT's poly tuner). B starts at zero.
    """

    n_skills: int = 8
    n_heads: int = 4
    rank: int = 4
    alpha: float = 1.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    relaxed_routing: bool = True
    temperature: float = 1.0
    init: str = "mttl"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        errors = []
        for name in ("n_skills", "n_heads", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            errors.append(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not _is_number(self.temperature) or not (0 < self.temperature < math.inf):
            errors.append(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not isinstance(self.relaxed_routing, bool):
            errors.append(f"relaxed_routing must be true or false, got {self.relaxed_routing!r}")
        if self.init not in INITS:
            errors.append(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        errors.extend(_target_errors(self.target_modules))
        if errors:
            raise ConfigError("invalid MHRConfig:\n  " + "\n  ".join(errors))

    @property
    def scaling(self) -> float:
        """Factor applied to the adapter output: alpha / rank."""
        return self.alpha / self.rank

    def matches(self, module_name: str) -> bool:
        """Whether `module_name` (a full dotted name) is one of the target modules."""
        return any(_target_matches(t, module_name) for t in self._targets())

    def unmatched_targets(self, module_names: list[str]) -> list[str]:
        """The target entries (names, or the regex) that match none of `module_names`."""
        return [getattr(t, "pattern", t) for t in self._targets()
                if not any(_target_matches(t, n) for n in module_names)]

    def _targets(self) -> list[re.Pattern | str]:
        if isinstance(self.target_modules, str):
            return [re.compile(self.target_modules)]
        return self.target_modules

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MHRConfig:
        """Build a config from a dict (e.g. a bundle manifest); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown MHRConfig field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**data)


def _target_matches(target: re.Pattern | str, module_name: str) -> bool:
    if isinstance(target, re.Pattern):
        return target.fullmatch(module_name) is not None
    return module_name == target or module_name.endswith("." + target)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _target_errors(targets: Any) -> list[str]:
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            return [f"target_modules regex {targets!r} does not compile: {e}"]
        return []
    if not isinstance(targets, list) or not targets:
        return [
            "target_modules must be a non-empty list of module names or a regex string, "
            f"got {targets!r}"
        ]
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        return [f"target_modules entries must be non-empty strings, got {bad!r}"]
    return []
