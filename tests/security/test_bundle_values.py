"""Alphas and scales on every way into a served bundle, and admin error bodies, over real loopback HTTP.

An alpha that is not a finite number > 0, or whose LoRA scale alpha / r passes `mhr.adapter.MAX_SCALING`,
is refused wherever it comes from (`?alpha=` of a dense upload, a PEFT archive's lora_alpha or
alpha_pattern, a manifest edited on disk and reloaded), with the bundle on disk byte-for-byte unchanged
and the old bundle serving, log-probabilities included. Admin error bodies name a bundle's files
relative to the bundle directory, never where it lives on the server.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import mhr
from server.http.app import ADAPTER_HEADER
from tests.server import loopback as http
from tests.server.admin_helpers import (
    ADMIN,
    PROMPT,
    admin_app,
    archive,
    copy_bundle,
    directory_files,
    engine_on,
    logits_upload,
    lora_upload,
    snapshot,
)
from tests.server.conftest import DENSE, ROUTED, random_logits, random_lora
from tests.server.loopback import serve_app

CONFIG, WEIGHTS = "adapter/adapter_config.json", "adapter/adapter_model.safetensors"


def scored(url: str, task: str) -> tuple[str, list]:
    """(text, token log-probabilities) of a greedy completion with logprobs: 200 or the test fails."""
    r = http.post(f"{url}/v1/completions", json={"model": task, "prompt": PROMPT, "max_tokens": 4,
                                                 "temperature": 0, "logprobs": 2})
    assert r.status_code == 200 and r.headers[ADAPTER_HEADER] == task, r.text
    choice = r.json()["choices"][0]
    assert all(math.isfinite(p) for p in choice["logprobs"]["token_logprobs"]), choice
    return choice["text"], choice["logprobs"]["token_logprobs"]


@pytest.fixture(scope="module")
def refusing(bundle_path, tmp_path_factory, tiny_llama_path):
    """One server for the refused uploads (nothing they send may change anything): (url, bundle dir, engine)."""
    directory = copy_bundle(bundle_path, tmp_path_factory.mktemp("values") / "bundle")
    engine = engine_on(tiny_llama_path, AutoTokenizer.from_pretrained(tiny_llama_path), directory)
    with serve_app(admin_app(engine, directory)) as url:
        yield url, directory, engine


@pytest.fixture(scope="module")
def served_before(refusing):
    return {task: scored(refusing[0], task) for task in (ROUTED[0], DENSE)}


def assert_nothing_changed(refusing, before: dict[str, str], served_before) -> None:
    url, directory, _ = refusing
    assert snapshot(directory) == before
    assert {task: scored(url, task) for task in served_before} == served_before


@pytest.mark.parametrize("alpha", ["inf", "-inf", "nan", "-1", "0", "1e308", "1e309", "40000.5"])
@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_a_dense_upload_alpha_out_of_bounds_is_refused(refusing, served_before, method, alpha):
    url, directory, engine = refusing
    before, manifest = snapshot(directory), (directory / "manifest.json").read_bytes()
    task = "new-dense" if method == "POST" else DENSE
    body = lora_upload(random_lora(engine.tasks.bundle, rank=4, seed=3))  # rank 4: the bound is alpha 40000
    r = http.request(method, f"{url}/admin/tasks/{task}?alpha={alpha}", content=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "alpha" and error["message"].startswith("alpha must be"), error
    assert (directory / "manifest.json").read_bytes() == manifest
    assert_nothing_changed(refusing, before, served_before)


@pytest.fixture(scope="module")
def peft(refusing, tmp_path_factory) -> dict[str, bytes]:
    lora = random_lora(refusing[2].tasks.bundle, rank=4, seed=5)
    return directory_files(mhr.export_peft(lora, tmp_path_factory.mktemp("peft") / "adapter", "tiny"))


def with_config(peft: dict[str, bytes], **changes) -> dict[str, bytes]:
    """The PEFT files with adapter_config.json changed (json.dumps writes inf and nan as JSON cannot)."""
    return peft | {CONFIG: json.dumps(json.loads(peft[CONFIG]) | changes).encode()}


@pytest.mark.parametrize("changes, says", [
    (dict(lora_alpha=math.inf), "field 'lora_alpha' must be a number > 0 and finite"),
    (dict(lora_alpha=math.nan), "field 'lora_alpha' must be a number > 0 and finite"),
    (dict(lora_alpha=1e308), "field 'lora_alpha' (module"),
    (dict(lora_alpha=1e6, use_rslora=True), "alpha / sqrt(r) = 5e+05"),
    (dict(alpha_pattern={"q_proj": math.inf}), "field 'alpha_pattern.q_proj'"),
], ids=["Infinity", "NaN", "1e308", "rsLoRA 1e6", "alpha_pattern Infinity"])
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_peft_archive_alpha_out_of_bounds_is_refused(refusing, served_before, peft, kind, changes, says):
    url, directory, _ = refusing
    before = snapshot(directory)
    r = http.post(f"{url}/admin/tasks/new-peft", content=archive(with_config(peft, **changes), kind), headers=ADMIN)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("upload: adapter_config.json: ") and says in message, message
    assert_nothing_changed(refusing, before, served_before)


def test_nan_in_a_peft_archive_weights_is_refused(refusing, served_before, peft, tmp_path):
    lora = random_lora(refusing[2].tasks.bundle, rank=4, seed=6)
    lora.B[lora.modules[0]][0, 0] = math.nan
    files = directory_files(mhr.export_peft(lora, tmp_path / "nan", "tiny"))
    before = snapshot(refusing[1])
    r = http.post(f"{refusing[0]}/admin/tasks/new-peft", content=archive(files, "tar.gz"), headers=ADMIN)
    assert r.status_code == 400 and "NaN or Inf" in r.json()["error"]["message"], r.text
    assert_nothing_changed(refusing, before, served_before)


# ----- bundles edited on disk ---------------------------------------------------------------------

def dense_index(manifest: dict) -> int:
    return next(i for i, t in enumerate(manifest["tasks"]) if t["name"] == DENSE)


EDITS = {  # name -> (change to the manifest, the field the refusal names)
    "config alpha Infinity": (lambda m: m["config"].__setitem__("alpha", math.inf), "config.alpha"),
    "config alpha 1e308": (lambda m: m["config"].__setitem__("alpha", 1e308), "config.alpha"),
    "dense alpha Infinity": (lambda m: m["tasks"][dense_index(m)].__setitem__("alpha", math.inf), "tasks[{i}].alpha"),
    "dense alpha NaN": (lambda m: m["tasks"][dense_index(m)].__setitem__("alpha", math.nan), "tasks[{i}].alpha"),
    "dense alpha 1e308": (lambda m: m["tasks"][dense_index(m)].__setitem__("alpha", 1e308), "tasks[{i}].alpha"),
    "dense alpha -1": (lambda m: m["tasks"][dense_index(m)].__setitem__("alpha", -1), "tasks[{i}].alpha"),
    "zero-shot alpha Infinity": (lambda m: m.__setitem__("zero_shot", {"alpha": math.inf}), "zero_shot.alpha"),
    "NaN in training metadata": (lambda m: m["training"].__setitem__("loss", math.nan), "training.loss"),
}


@pytest.fixture
def live(bundle_path, tmp_path, tiny_llama_path, tiny_tokenizer):
    """A server of its own on a private bundle copy, for tests that damage the bundle: (url, bundle dir)."""
    directory = copy_bundle(bundle_path, tmp_path / "bundle")
    with serve_app(admin_app(engine_on(tiny_llama_path, tiny_tokenizer, directory), directory)) as url:
        yield url, directory


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_manifest_edited_to_a_bad_number_is_refused_on_reload_and_the_old_bundle_serves(live, edit):
    url, directory = live
    before = {task: scored(url, task) for task in (ROUTED[0], DENSE)}
    change, field = EDITS[edit]
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))  # Infinity, NaN: as a hand edit writes them
    r = http.post(f"{url}/admin/reload", headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_bundle", r.text
    message = r.json()["error"]["message"]
    assert f"manifest.json: field '{field.format(i=dense_index(manifest))}'" in message, message
    assert str(directory) not in message
    assert {task: scored(url, task) for task in before} == before


# ----- error bodies name no absolute path ---------------------------------------------------------

def stored_file(directory: Path, prefix: str) -> Path:
    (path,) = directory.glob(f"{prefix}.*.safetensors")
    return path


DAMAGES = {  # name -> (damage to the bundle directory, the status of reload, what its message names)
    "missing tensor file": (lambda d: stored_file(d, "routing").unlink(), 400, "routing."),
    "tensor file changed": (lambda d: stored_file(d, "inventory").write_bytes(b"x" * 64), 400, "inventory."),
    "manifest not JSON": (lambda d: (d / "manifest.json").write_text("{"), 400, "manifest.json: not valid JSON"),
    "manifest alpha Infinity": (lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"alpha": 8.0', '"alpha": Infinity', 1)), 400,
        "manifest.json: field 'config.alpha'"),
    "adapters is a file": (lambda d: shutil.rmtree(d / "adapters") or (d / "adapters").write_text("x"), 500,
                           "Not a directory: adapters/"),
    "bundle directory gone": (lambda d: shutil.rmtree(d), 400, "the bundle directory"),
}


@pytest.fixture(scope="module")
def uploads(bundle_path) -> dict[str, bytes]:
    bundle = mhr.Bundle.load(bundle_path)
    return {"routed": logits_upload(random_logits(bundle, seed=7)), "dense": lora_upload(random_lora(bundle, 4, 7))}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_admin_error_bodies_name_files_relative_to_the_bundle(live, uploads, damage, tmp_path):
    url, directory = live
    harm, status, names = DAMAGES[damage]
    harm(directory)
    r = http.post(f"{url}/admin/reload", headers=ADMIN)
    assert r.status_code == status and names in r.json()["error"]["message"], r.text
    bodies = [r.text]
    for method, task, kind in [("POST", "another", "routed"), ("PUT", DENSE, "dense"), ("DELETE", ROUTED[0], None)]:
        r = http.request(method, f"{url}/admin/tasks/{task}", headers=ADMIN, content=uploads.get(kind))
        assert r.status_code in (400, 500), r.text
        bodies.append(r.text)
    for root in {str(directory), str(directory.resolve()), str(tmp_path), tempfile.gettempdir() + "/"}:
        assert not [b for b in bodies if root in b], (root, bodies)
    assert scored(url, ROUTED[0])  # the old bundle keeps serving
