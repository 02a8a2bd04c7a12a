"""Numbers a bundle holds: every alpha finite, > 0 and within the scale bound; a manifest of standard JSON.

Each alpha (the config's, a dense task's, the zero-shot adapter's) is refused with an error naming
manifest.json and the field, on load (a manifest edited on disk) and on every way into a bundle (the
task API, save). Refusals leave the directory byte-for-byte as it was. The fixtures (tests/mhr/conftest.py)
and helpers (tests/mhr/bundles.py) are those of the other bundle tests.
"""

from __future__ import annotations

import json
import math

import pytest

from mhr import Bundle, BundleError, MHRConfig
from mhr.adapter import MAX_SCALING, scale_problem
from tests.mhr.bundles import CONFIG, DENSE_MODULES, edit_manifest, load_error, manifest_of, random_lora

BAD_ALPHAS = [math.inf, -math.inf, math.nan, 1e308, 0, -1.0]


def snapshot(path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def strict_json(text: str) -> dict:
    """Parse as standard JSON: NaN and Infinity are not JSON and fail here."""
    def refuse(constant: str):
        raise ValueError(f"not standard JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("alpha, rank, fit", [
    (1.0, 4, True), (MAX_SCALING * 4, 4, True), (MAX_SCALING * 4 * 1.001, 4, False), (1e-30, 1, True),
    (math.inf, 4, False), (math.nan, 4, False), (0, 4, False), (-2.0, 4, False), (True, 4, False),
    ("8", 4, False), (None, 4, False), (10 ** 400, None, False), (1e308, None, True), (1e308, 1, False),
])
def test_scale_problem(alpha, rank, fit):
    assert (scale_problem(alpha, rank) is None) == fit


@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=str)
@pytest.mark.parametrize("field", ["config.alpha", "tasks[dense-1].alpha", "zero_shot.alpha"])
def test_an_alpha_edited_on_disk_is_refused_on_load_naming_the_field(saved, field, alpha):
    index = next(i for i, t in enumerate(manifest_of(saved)["tasks"]) if t["name"] == "dense-1")
    label = field.replace("[dense-1]", f"[{index}]")

    def change(m: dict) -> None:
        (m["tasks"][index] if field.startswith("tasks") else m[field.split(".")[0]])["alpha"] = alpha
    edit_manifest(saved, change)  # json.dumps writes inf as Infinity, as a hand edit might
    msg = load_error(saved)
    assert "manifest.json" in msg and f"field '{label}'" in msg, msg
    assert "must be > 0 and finite" in msg or f"at most {MAX_SCALING:g} x rank" in msg, msg


def test_a_nan_anywhere_in_the_manifest_is_refused_on_load(saved):
    edit_manifest(saved, lambda m: m["training"]["metrics"].__setitem__("loss", math.nan))
    msg = load_error(saved)
    assert "manifest.json" in msg and "field 'training.metrics.loss' is nan" in msg


def test_a_number_past_float_range_is_refused_on_load(saved):
    manifest = saved / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"steps": 10', '"steps": 1e999', 1))  # standard JSON
    msg = load_error(saved)
    assert "manifest.json" in msg and "field 'training.steps' is inf" in msg


@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=str)
def test_a_dense_alpha_out_of_bounds_is_refused_by_the_task_api(bundle, alpha):
    lora = random_lora(DENSE_MODULES, 2, 2.0, seed=11)
    lora.alpha = alpha
    with pytest.raises(BundleError, match="LoRA of task 'delta': alpha must be"):
        bundle.add_dense_task("delta", lora)
    with pytest.raises(BundleError, match="zero-shot LoRA: alpha must be"):
        bundle.set_zero_shot(lora)
    assert "delta" not in bundle.task_names


def test_save_refuses_a_config_scale_above_the_bound_and_writes_nothing(bundle, saved):
    before = snapshot(saved)
    bundle.config = MHRConfig(**(CONFIG.to_dict() | {"alpha": 1e308}))  # finite: MHRConfig takes it
    with pytest.raises(BundleError) as e:
        bundle.save(saved)
    assert "manifest.json" in str(e.value) and "field 'config.alpha'" in str(e.value)
    assert snapshot(saved) == before


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_save_refuses_numbers_json_cannot_hold_and_writes_standard_json(bundle, saved, value):
    before = snapshot(saved)
    bundle.training["final_loss"] = value
    with pytest.raises(BundleError, match="field 'training.final_loss' is (nan|inf)"):
        bundle.save(saved)
    assert snapshot(saved) == before
    bundle.tasks[-1].metadata["score"] = 0.5
    del bundle.training["final_loss"]
    bundle.save(saved)
    assert strict_json((saved / "manifest.json").read_text())["tasks"][-1]["metadata"] == {"score": 0.5}
    assert Bundle.load(saved).tasks[-1].metadata == {"score": 0.5}
