"""The embedded demo: an MHR bundle of some of the suite's tasks on the shipped backbone, built locally, cached.

Owns the demo recipe (which tasks, the MHR run, the zero-shot run, the torch threads) and the cache
directory that holds its result. Leaves the backbone to `training.backbone` (the demo copies the shipped one,
`training/assets/backbone`, and never trains it), the MHR training to `training.pretrain` and
`training.zeroshot`, and serving to `server`.

Steps, each seeded, on a fixed number of torch threads (other counts round differently), so the same recipe
gives the same bundle on every machine as far as torch's CPU kernels allow:
  1. the suite's files (suite v2, plain prompts "kabadu ->": only the adapter knows the task), limited to
     the recipe's training tasks and the validation and held-out tasks made of their skills;
  2. an MHR bundle trained on the training tasks;
  3. its zero-shot adapter: the best on the validation tasks of the backbone alone, the skills' average and
     the average trained further (`training.zeroshot`);
  4. exact match per task on the held-in test words and zero-shot on the held-out tasks, in the marker file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from training import suite
from training.backbone import SHIPPED
from training.config import TrainConfig
from training.data import read_jsonl

# Bump when anything below changes what a build produces: a cache of another version is rebuilt.
RECIPE_VERSION = 2
MARKER = "demo.json"
SERVING = "serving"  # the copy of the bundle the server serves and admin deploys write to
SERVING_MARKER = "serving.build"  # which build the served copy was made from (a hash of its marker)
DEFAULT_CACHE = Path(".cache/mhr-demo")
DEMO_ADMIN_KEY = "demo-admin-key"
# Training tasks: 19 of the suite's, chaining one or two of eight of its skills; the suite's validation and
# held-out tasks made only of those skills come along (suite.write_suite's `only`).
TRAIN_TASKS = ("reverse", "upper", "sort", "novowel", "rot1", "double", "dropfirst", "mirror", "reverse.upper",
               "upper.double", "double.rot1", "reverse.rot1", "reverse.novowel", "upper.rot1", "upper.dropfirst",
               "dropfirst.reverse", "dropfirst.rot1", "rot1.mirror", "sort.rot1")
SKILLS = frozenset(skill for task in TRAIN_TASKS for skill in task.split("."))
TASKS = TRAIN_TASKS + tuple(t for t in suite.VALIDATION_TASKS + suite.HELD_OUT_TASKS if set(t.split(".")) <= SKILLS)


@dataclass(frozen=True)
class Recipe:
    """Everything a demo build depends on besides the shipped backbone. Sizes fit a build of about two
    minutes on 2 CPU cores."""

    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    threads: int = 1  # torch threads while building
    n_train: int = 256  # words per training task: with 64, exact match on new words was 0.05 (here 0.51)
    n_test: int = 16
    n_shots: int = 32
    skills: int = 8
    mhr_heads: int = 4
    rank: int = 8
    alpha: float = 8.0
    mhr_steps: int = 1000
    adapter_lr: float = 1e-2
    batch_size: int = 16
    zeroshot_steps: int = 60
    zeroshot_eval_every: int = 30


@dataclass
class DemoBuild:
    """Where a demo build lives and what it measured."""

    root: Path
    recipe: dict = field(default_factory=dict)
    exact_match: dict[str, float] = field(default_factory=dict)
    zero_shot_exact_match: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def backbone(self) -> Path:
        return self.root / "backbone"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def suite(self) -> Path:
        return self.root / "suite"


def adapter_config(recipe: Recipe, method: str, steps: int) -> TrainConfig:
    """The TrainConfig of the demo's adapter runs: every linear layer of each block adapted."""
    return TrainConfig(method=method, skills=recipe.skills, heads=recipe.mhr_heads, rank=recipe.rank,
                       alpha=recipe.alpha, target_modules=list(TARGET_MODULES), steps=steps,
                       batch_size=recipe.batch_size, lr=recipe.adapter_lr, logits_lr=0.1,
                       warmup_steps=min(20, steps // 10), seed=recipe.seed, device="cpu", max_length=64)


TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def backbone_hash(backbone: Path = SHIPPED) -> str:
    """A hash of the backbone's files: a rebuilt backbone (`make backbone`) is another demo."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(backbone).iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cached(root: str | Path, recipe: Recipe = Recipe()) -> DemoBuild | None:
    """The build in `root` when it is complete and made by this recipe (and recipe version) from the shipped
    backbone as it is now, else None."""
    marker = Path(root) / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (data.get("recipe_version") != RECIPE_VERSION or data.get("recipe") != json.loads(json.dumps(asdict(recipe)))
            or data.get("backbone_sha256") != backbone_hash()):
        return None
    return DemoBuild(Path(root), data["recipe"], data.get("exact_match", {}),
                     data.get("zero_shot_exact_match", {}), data.get("seconds", 0.0))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on `n` torch threads, then restore the number it had."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build(root: str | Path = DEFAULT_CACHE, recipe: Recipe = Recipe(), *, force: bool = False,
          progress: bool = True, log: Callable[[str], None] = print) -> DemoBuild:
    """The demo bundle in `root`: reused when cached for this recipe, else built (about two minutes).

    The marker file is written last, so an interrupted build is never taken for a finished one; the
    bundle records the backbone's path in `root`, so `mhr adapt --bundle <root>/bundle` finds it unaided.
    """
    root = Path(root)
    if not force and (found := cached(root, recipe)) is not None:
        return found
    start = time.monotonic()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    result = DemoBuild(root.resolve(), asdict(recipe))
    with torch_threads(recipe.threads):
        _train_and_score(result, recipe, progress, log)
    result.seconds = round(time.monotonic() - start, 1)
    (root / MARKER).write_text(json.dumps({"recipe_version": RECIPE_VERSION, "backbone_sha256": backbone_hash(),
                                           **asdict(result), "root": str(result.root)}, indent=2) + "\n")
    return cached(root, recipe)  # as a later run finds it (paths under `root` as given)


def _train_and_score(result: DemoBuild, recipe: Recipe, progress: bool, log: Callable[[str], None]) -> None:
    """Steps 1-4 of the module docstring, into `result`'s directory; the scores into `result`."""
    from training.evaluate import evaluate_bundle
    from training.pretrain import pretrain
    from training.zeroshot import zeroshot

    log(f"[1/4] suite and the shipped backbone -> {result.root}")
    paths = suite.write_suite(result.suite, recipe.n_train, recipe.n_test, recipe.n_shots, recipe.seed,
                              only=recipe.tasks)
    shutil.copytree(SHIPPED, result.backbone)
    train = read_jsonl(paths["train"])
    log(f"[2/4] MHR bundle on {len({ex.task for ex in train})} training tasks -> {result.bundle}")
    pretrain(str(result.backbone), train, adapter_config(recipe, "mhr", recipe.mhr_steps), result.bundle,
             data_name=paths["train"].name, progress=progress)
    log("[3/4] zero-shot adapter, chosen on the validation tasks")
    zeroshot(result.bundle, train, adapter_config(recipe, "mhr-mu", recipe.zeroshot_steps),
             data_name=paths["train"].name, validation=read_jsonl(paths["validation-test"]),
             eval_every=recipe.zeroshot_eval_every, max_new_tokens=16, progress=progress)
    log("[4/4] exact match on held-in test words (training tasks) and zero-shot on held-out tasks")
    report = evaluate_bundle(result.bundle, read_jsonl(paths["test"]), max_new_tokens=16, batch_size=64)
    result.exact_match = {t: s["exact_match"] for t, s in report["tasks"].items()}
    report = evaluate_bundle(result.bundle, read_jsonl(paths["heldout-test"]), zero_shot=True,
                             max_new_tokens=16, batch_size=64)
    result.zero_shot_exact_match = {t: s["exact_match"] for t, s in report["tasks"].items()}


def serving_copy(build: DemoBuild, *, reset: bool = False) -> tuple[Path, bool]:
    """The copy of the demo bundle to serve, and whether it was copied afresh now (else kept from a past run).

    Admin deploys change this copy, never the cached build. It is kept from one run to the next, so tasks
    deployed to the demo server survive a restart; it is copied from the build when absent, when `reset`, or
    when it was copied from another build (a rebuild, for a new recipe or by request).
    The copy is made beside the target and renamed into place, so an interrupted copy is never served.
    """
    target, marker = build.root / SERVING, build.root / SERVING_MARKER
    origin = _build_id(build)
    if not reset and target.is_dir() and _read_text(marker) == origin:
        return target, False
    fresh = build.root / f"{SERVING}.partial"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(build.bundle, fresh)
    shutil.rmtree(target, ignore_errors=True)
    fresh.rename(target)
    marker.write_text(origin)
    return target, True


def _build_id(build: DemoBuild) -> str:
    """A hash of the build's marker file, written when the build finished: another build writes another one."""
    return hashlib.sha256(_read_text(build.root / MARKER).encode()).hexdigest()


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def summary(build: DemoBuild) -> str:
    """Exact match per task (training tasks, held-in test words) and zero-shot on the held-out tasks."""
    def mean(scores: dict[str, float]) -> float:
        return sum(scores.values()) / max(1, len(scores))

    lines = [f"{'task':18s} exact match (held-in test words)"]
    lines += [f"{t:18s} {v:.2f}" for t, v in build.exact_match.items()]
    lines.append(f"{'average':18s} {mean(build.exact_match):.2f}")
    lines.append("zero-shot on held-out tasks: " + ", ".join(
        f"{t} {v:.2f}" for t, v in build.zero_shot_exact_match.items()))
    lines.append(f"built in {build.seconds:.0f}s; backbone {build.backbone}, bundle {build.bundle}")
    return "\n".join(lines)
