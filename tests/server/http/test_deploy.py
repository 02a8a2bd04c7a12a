"""Admin routes over real loopback HTTP: auth, deploy/replace/delete of every upload kind, refusals, reload.

Every test that writes works on its own copy of the session bundle. References are engines built
directly on a bundle that holds the same change (made with the `mhr.Bundle` API, no HTTP).
"""

from __future__ import annotations

import hmac
import json
import tempfile
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer

import mhr
from server.http.app import ADAPTER_HEADER
from tests.server import loopback as http
from tests.server.admin_helpers import (
    ADMIN,
    ADMIN_KEY,
    API_KEY,
    MAX_TOKENS,
    PROMPT,
    admin_app,
    archive,
    copy_bundle,
    directory_files,
    engine_on,
    generate,
    logits_upload,
    lora_upload,
    snapshot,
)
from tests.server.conftest import DENSE, ROUTED, random_logits, random_lora
from tests.server.loopback import serve_app

SAFETENSORS = {"content-type": "application/octet-stream"}


def complete(url: str, task: str, headers: dict | None = None) -> httpx.Response:
    r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                   json={"model": task, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    return r


def served(url: str, task: str, headers: dict | None = None) -> tuple[str, str]:
    """(text, adapter) the server answers for `task`; the header and the `mhr` field must agree."""
    body = complete(url, task, headers)
    adapter = body.json()["mhr"]["adapter"]
    assert body.headers[ADAPTER_HEADER] == adapter
    return body.json()["choices"][0]["text"], adapter


def reference(tiny_llama_path, tiny_tokenizer, bundle_dir: Path, change, task: str) -> tuple[str, str]:
    """What an engine on `bundle_dir`'s bundle, changed by `change(bundle)`, answers for `task`."""
    bundle = mhr.Bundle.load(bundle_dir)
    change(bundle)
    return generate(engine_on(tiny_llama_path, tiny_tokenizer, bundle), tiny_tokenizer, task)


@pytest.fixture
def bundle_dir(bundle_path, tmp_path):
    return copy_bundle(bundle_path, tmp_path / "bundle")


@pytest.fixture
def engine(tiny_llama_path, tiny_tokenizer, bundle_dir):
    return engine_on(tiny_llama_path, tiny_tokenizer, bundle_dir)


@pytest.fixture
def server(engine, bundle_dir):
    with serve_app(admin_app(engine, bundle_dir)) as url:
        yield url


# ----- auth -----------------------------------------------------------------------------------------

def test_admin_routes_are_disabled_without_an_admin_key(engine, bundle_dir):
    before = snapshot(bundle_dir)
    with serve_app(admin_app(engine, bundle_dir, admin_key=None, api_key=API_KEY)) as url:
        for headers in ({}, ADMIN, {"Authorization": f"Bearer {API_KEY}"}):
            r = http.post(f"{url}/admin/reload", headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "disabled", r.text
            r = http.delete(f"{url}/admin/tasks/{ROUTED[0]}", headers=headers)
            assert r.status_code == 403
    assert snapshot(bundle_dir) == before


def test_admin_key_is_required_compared_in_constant_time_and_separate_from_the_api_key(
        engine, bundle_dir, monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    with serve_app(admin_app(engine, bundle_dir, api_key=API_KEY)) as url:
        for headers in ({}, {"Authorization": "Bearer wrong-key-wrong"}, {"Authorization": f"Bearer {API_KEY}"},
                        {"Authorization": ADMIN_KEY}, {"Authorization": f"Basic {ADMIN_KEY}"}):
            r = http.post(f"{url}/admin/reload", headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        assert (API_KEY.encode(), ADMIN_KEY.encode()) in compared  # the inference key was compared, refused
        r = http.post(f"{url}/admin/reload", headers=ADMIN)
        assert r.status_code == 200, r.text
        # ... and the admin key is no inference key
        r = http.post(f"{url}/v1/completions", headers=ADMIN, json={"model": ROUTED[0], "prompt": PROMPT})
        assert r.status_code == 401


# ----- deploy, replace, delete ----------------------------------------------------------------------

def test_a_routed_task_is_deployed_served_persisted_replaced_and_deleted(
        server, engine, bundle_dir, tiny_llama_path, tiny_tokenizer):
    task = "fresh-task"
    revision = mhr.Bundle.load(bundle_dir).revision
    first, second = random_logits(engine.tasks.bundle, seed=11), random_logits(engine.tasks.bundle, seed=12)
    zero_shot = served(server, task)
    assert zero_shot[1] == "zero-shot"

    r = http.post(f"{server}/admin/tasks/{task}", content=logits_upload(first), headers=ADMIN | SAFETENSORS)
    assert r.status_code == 201, r.text
    assert r.json() == {"task": task, "kind": "routed", "replaced": False, "revision": revision + 1}
    expected = reference(tiny_llama_path, tiny_tokenizer, bundle_dir, lambda b: None, task)  # disk has it now
    assert served(server, task) == expected and expected[1] == task
    on_disk = mhr.Bundle.load(bundle_dir)
    assert task in on_disk.task_names and on_disk.revision == revision + 1
    assert all(torch.equal(on_disk.routing_logits(task)[m], first[m]) for m in first)
    assert task in [m["id"] for m in http.get(f"{server}/v1/models").json()["data"]]

    before = snapshot(bundle_dir)
    r = http.post(f"{server}/admin/tasks/{task}", content=logits_upload(second), headers=ADMIN | SAFETENSORS)
    assert r.status_code == 409 and r.json()["error"]["code"] == "task_exists"
    assert snapshot(bundle_dir) == before and served(server, task) == expected

    r = http.put(f"{server}/admin/tasks/{task}", content=logits_upload(second), headers=ADMIN | SAFETENSORS)
    assert r.status_code == 200 and r.json()["replaced"] is True and r.json()["revision"] == revision + 2
    replaced = reference(tiny_llama_path, tiny_tokenizer, bundle_dir, lambda b: None, task)
    assert served(server, task) == replaced and replaced != expected

    slot = engine.cache.slot_of(engine.tasks.resolve(task))
    assert slot is not None  # resident after serving
    r = http.delete(f"{server}/admin/tasks/{task}", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"task": task, "deleted": True, "revision": revision + 3}
    assert task not in mhr.Bundle.load(bundle_dir).task_names
    assert all(key.name != task for key in engine.cache.resident())  # its slot is free again
    assert served(server, task) == zero_shot
    assert task not in [m["id"] for m in http.get(f"{server}/v1/models").json()["data"]]
    r = http.delete(f"{server}/admin/tasks/{task}", headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"


def test_a_reference_engine_on_a_copy_with_the_task_added_agrees(server, engine, bundle_path, tmp_path,
                                                                  tiny_llama_path, tiny_tokenizer):
    """The reference of the test above, built the way a user would: a copy of the bundle plus the task."""
    logits = random_logits(engine.tasks.bundle, seed=21)
    r = http.post(f"{server}/admin/tasks/copy-check", content=logits_upload(logits), headers=ADMIN)
    assert r.status_code == 201, r.text
    expected = reference(tiny_llama_path, tiny_tokenizer, copy_bundle(bundle_path, tmp_path / "ref"),
                         lambda b: b.add_routed_task("copy-check", logits), "copy-check")
    assert served(server, "copy-check") == expected


def test_a_dense_lora_upload_with_alpha(server, engine, bundle_path, tmp_path, bundle_dir,
                                        tiny_llama_path, tiny_tokenizer):
    lora = random_lora(engine.tasks.bundle, rank=4, seed=5, alpha=1.0)
    r = http.post(f"{server}/admin/tasks/my-lora?alpha=2.5", content=lora_upload(lora), headers=ADMIN)
    assert r.status_code == 201 and r.json()["kind"] == "dense", r.text
    scaled = mhr.LoRA(lora.A, lora.B, alpha=2.5)
    expected = reference(tiny_llama_path, tiny_tokenizer, copy_bundle(bundle_path, tmp_path / "ref"),
                         lambda b: b.add_dense_task("my-lora", scaled), "my-lora")
    assert served(server, "my-lora") == expected
    assert mhr.Bundle.load(bundle_dir).adapters["my-lora"].equal(scaled)
    r = http.put(f"{server}/admin/tasks/my-lora", content=lora_upload(lora), headers=ADMIN)  # alpha = rank
    assert r.status_code == 200, r.text
    assert mhr.Bundle.load(bundle_dir).adapters["my-lora"].alpha == 4.0


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_a_peft_directory_archive(kind, server, engine, bundle_path, tmp_path, tiny_llama_path, tiny_tokenizer):
    lora = random_lora(engine.tasks.bundle, rank=4, seed=6, alpha=8.0)
    peft_dir = mhr.export_peft(lora, tmp_path / "peft", str(tiny_llama_path))
    r = http.post(f"{server}/admin/tasks/peft-task", content=archive(directory_files(peft_dir), kind),
                   headers=ADMIN)
    assert r.status_code == 201 and r.json()["kind"] == "dense", r.text
    expected = reference(tiny_llama_path, tiny_tokenizer, copy_bundle(bundle_path, tmp_path / "ref"),
                         lambda b: b.add_dense_task("peft-task", mhr.import_peft(peft_dir)), "peft-task")
    assert served(server, "peft-task") == expected
    assert expected != served(server, "unseen")


# ----- refusals -------------------------------------------------------------------------------------

UPLOAD_LIMIT = 64 << 10  # bytes (max_upload_mb = 1/16)


@pytest.fixture(scope="module")
def refusing(bundle_path, tmp_path_factory, tiny_llama_path):
    """One server for the refusal tests (nothing they send may change anything): (url, bundle dir, engine)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    directory = copy_bundle(bundle_path, tmp_path_factory.mktemp("refusals") / "bundle")
    engine = engine_on(tiny_llama_path, tokenizer, directory)
    with serve_app(admin_app(engine, directory, max_upload_mb=UPLOAD_LIMIT / 2**20)) as url:
        yield url, directory, engine


def _bad_uploads(bundle: mhr.Bundle, tmp: Path, model_path) -> dict[str, tuple[bytes, str, int, str]]:
    """name -> (body, query, status, what the message says)."""
    good = random_logits(bundle, seed=3)
    module = next(iter(good))
    h, K = good[module].shape
    nan = dict(good) | {module: torch.full((h, K), float("nan"))}
    lora = random_lora(bundle, rank=4, seed=4)
    inf = mhr.LoRA(lora.A, {m: b.clone() for m, b in lora.B.items()}, lora.alpha)
    inf.B[lora.modules[0]][0, 0] = float("inf")
    peft = directory_files(mhr.export_peft(lora, tmp / "peft", str(model_path)))
    config_only = {k: v for k, v in peft.items() if k.endswith(".json")}
    zeros = {"adapter/adapter_config.json": peft["adapter/adapter_config.json"],
             "adapter/adapter_model.safetensors": bytes(4 * UPLOAD_LIMIT)}
    return {
        "wrong shape": (logits_upload({m: torch.zeros(h + 1, K) for m in good}), "", 400, "expected shape"),
        "NaN logits": (logits_upload(nan), "", 400, "NaN"),
        "Inf in a LoRA": (lora_upload(inf), "", 400, "NaN or Inf"),
        "missing module": (logits_upload({m: t for m, t in good.items() if m != module}), "", 400, "no logits"),
        "extra module": (logits_upload(good | {"model.nowhere.q_proj": good[module].clone()}), "", 400,
                         "not in the bundle"),
        "LoRA of an unknown module": (lora_upload(mhr.LoRA({"nowhere": torch.zeros(64, 4)},
                                                           {"nowhere": torch.zeros(4, 64)}, 4.0)),
                                      "", 400, "not in the bundle"),
        "LoRA with a half missing": (logits_upload({f"{module}.lora_A": torch.zeros(64, 4)}), "", 400, "missing"),
        "rank above the slots": (lora_upload(random_lora(bundle, rank=8, seed=4)), "", 400, "exceeds"),
        "alpha for logits": (logits_upload(good), "?alpha=2", 400, "alpha"),
        "alpha <= 0": (lora_upload(lora), "?alpha=-1", 400, "alpha"),
        "garbage": (b"\x00garbage, not an upload" * 20, "", 400, "not a valid safetensors"),
        "empty body": (b"", "", 400, "empty upload"),
        "oversized": (bytes(2 * UPLOAD_LIMIT), "", 413, "larger than"),
        "archive lacking files": (archive(config_only, "tar.gz"), "", 400, "lacks"),
        "zip lacking files": (archive(config_only, "zip"), "", 400, "lacks"),
        "tar with ../ paths": (archive({"../../evil": b"x", **peft}, "tar.gz"), "", 400, "'..' path"),
        "zip with ../ paths": (archive({"../../evil/adapter_config.json": b"{}", **peft}, "zip"), "", 400,
                               "'..' path"),
        "tar with an absolute path": (archive({"/tmp/evil": b"x", **peft}, "tar"), "", 400, "absolute"),
        "two adapters in one archive": (archive({**peft, **{"b/" + k: v for k, v in peft.items()}}, "zip"),
                                        "", 400, "more than one"),
        "tar.gz bomb": (archive(zeros, "tar.gz"), "", 413, "unpacks to more than"),
        "zip bomb": (archive(zeros, "zip"), "", 413, "unpacks to more than"),
        "truncated tar.gz": (archive(peft, "tar.gz")[:200], "", 400, "truncated"),
        "corrupt zip": (archive(peft, "zip")[:300], "", 400, "unreadable archive"),
        "bad PEFT config": (archive(peft | {"adapter/adapter_config.json": b'{"peft_type": "IA3"}'}, "zip"),
                            "", 400, "LORA"),
    }


BAD_UPLOADS = ["wrong shape", "NaN logits", "Inf in a LoRA", "missing module", "extra module",
               "LoRA of an unknown module", "LoRA with a half missing", "rank above the slots", "alpha for logits",
               "alpha <= 0", "garbage", "empty body", "oversized", "archive lacking files", "zip lacking files",
               "tar with ../ paths", "zip with ../ paths", "tar with an absolute path", "two adapters in one archive",
               "tar.gz bomb", "zip bomb", "truncated tar.gz", "corrupt zip", "bad PEFT config"]
REPLACING = ["wrong shape", "NaN logits", "Inf in a LoRA", "missing module", "rank above the slots",
             "tar with ../ paths", "zip bomb", "oversized"]  # also sent as PUT over an existing task


@pytest.fixture(scope="module")
def bad_uploads(refusing, tmp_path_factory, tiny_llama_path):
    return _bad_uploads(refusing[2].tasks.bundle, tmp_path_factory.mktemp("uploads"), tiny_llama_path)


@pytest.fixture(scope="module")
def served_before(refusing):
    return served(refusing[0], ROUTED[0])


@pytest.mark.parametrize("case, method", [(c, "POST") for c in BAD_UPLOADS] + [(c, "PUT") for c in REPLACING])
def test_bad_uploads_are_refused_and_change_nothing(case, method, refusing, bad_uploads, served_before, tmp_path):
    url, directory, engine = refusing
    body, query, status, says = bad_uploads[case]
    task = "new-task" if method == "POST" else ROUTED[0]
    before = snapshot(directory)
    r = http.request(method, f"{url}/admin/tasks/{task}{query}", content=body, headers=ADMIN)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error", error
    assert snapshot(directory) == before
    outside = [tmp_path.parent, directory.parent.parent, Path.cwd().parent.parent, Path(tempfile.gettempdir())]
    assert not any((d / "evil").exists() for d in outside) and not list(tmp_path.parent.rglob("evil"))
    assert http.get(f"{url}/health").status_code == 200
    assert served(url, ROUTED[0]) == served_before and "new-task" not in engine.tasks.task_names


@pytest.mark.parametrize("path, statuses", [
    ("..%2Fx", (400, 404)),
    ("..%2F..%2Fmanifest.json", (400, 404)),
    ("..", (400, 404)),
    ("x" * 200, (400,)),
    ("t%C3%A2che", (400,)),            # "tâche"
    ("ta%E2%80%8Bsk", (400,)),         # a zero-width space inside
    ("%2Fetc%2Fpasswd", (400, 404)),
    ("zero-shot", (400,)),             # the id responses give the zero-shot adapter
    ("mix-0123abcd", (400,)),          # the names per-request mixtures get
])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_invalid_task_names_in_the_path(path, statuses, method, refusing):
    url, directory, _ = refusing
    before = snapshot(directory)
    body = logits_upload(random_logits(refusing[2].tasks.bundle, seed=1))
    r = http.request(method, f"{url}/admin/tasks/{path}", content=body if method != "DELETE" else None,
                      headers=ADMIN)
    assert r.status_code in statuses, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert snapshot(directory) == before and http.get(f"{url}/health").status_code == 200


# ----- reload -------------------------------------------------------------------------------------

def test_reload_serves_what_another_replica_wrote(server, engine, bundle_dir, tiny_llama_path, tiny_tokenizer):
    replica = mhr.Bundle.load(bundle_dir)
    replica.add_routed_task("from-replica", random_logits(replica, seed=31))
    replica.remove_task(ROUTED[5])
    replica.save(bundle_dir)
    assert served(server, "from-replica")[1] == "zero-shot"  # not before the reload
    r = http.post(f"{server}/admin/reload", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"tasks": replica.task_names, "revision": replica.revision}
    expected = reference(tiny_llama_path, tiny_tokenizer, bundle_dir, lambda b: None, "from-replica")
    assert served(server, "from-replica") == expected
    assert expected[1] == "from-replica" and served(server, ROUTED[5])[1] == "zero-shot"
    assert [m["id"] for m in http.get(f"{server}/v1/models").json()["data"]][-2:] == ["from-replica", "zero-shot"]


@pytest.mark.parametrize("damage", ["tensor bytes", "truncated file", "manifest"])
def test_a_corrupt_bundle_is_refused_on_reload_and_the_old_one_keeps_serving(damage, server, engine, bundle_dir):
    before = {task: served(server, task) for task in (ROUTED[0], DENSE, "unseen")}
    if damage == "manifest":
        manifest = bundle_dir / "manifest.json"
        data = json.loads(manifest.read_text())
        data["config"]["n_heads"] = 3
        manifest.write_text(json.dumps(data))
    else:
        (victim,) = [p for p in bundle_dir.glob("routing.*.safetensors")]
        data = bytearray(victim.read_bytes())
        if damage == "truncated file":
            del data[len(data) // 2:]
        else:
            data[-8:] = b"\xff" * 8  # inside the last tensor: still parses, fails its checksum
        victim.write_bytes(bytes(data))
    r = http.post(f"{server}/admin/reload", headers=ADMIN)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_bundle" and "keeps serving" in r.json()["error"]["message"]
    assert {task: served(server, task) for task in before} == before
    # a deploy now refuses too (it starts from the bundle on disk) and leaves the damage as it was
    damaged = snapshot(bundle_dir)
    upload = logits_upload(random_logits(engine.tasks.bundle, seed=41))
    r = http.post(f"{server}/admin/tasks/another", content=upload, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter", r.text
    assert snapshot(bundle_dir) == damaged and "another" not in engine.tasks.task_names


# ----- capacity -----------------------------------------------------------------------------------

def test_adapter_slots_are_resized_live_and_refused_while_in_use(server, engine, bundle_dir):
    text = served(server, ROUTED[0])
    r = http.put(f"{server}/admin/slots", headers=ADMIN, json={"n_slots": 20})
    assert r.status_code == 200 and r.json() == {"n_slots": 20, "slots_in_use": engine.stats().slots_in_use}
    assert served(server, ROUTED[0]) == text and engine.stats().slots == 20
    metrics = http.get(f"{server}/metrics").text
    assert "mhr_adapter_slots 20.0" in metrics
    with engine._lock:  # between steps, as the engine admits: held as running requests hold them
        held = [engine.cache.acquire(key, lambda key=key: engine.tasks.load(key))
                for key in (engine.tasks.resolve(t) for t in ROUTED[1:4])]
        engine.cache.write_pending()
    r = http.put(f"{server}/admin/slots", headers=ADMIN, json={"n_slots": 3})
    assert r.status_code == 409 and r.json()["error"]["code"] == "slots_busy", r.text
    assert "nothing changed" in r.json()["error"]["message"] and engine.stats().slots == 20
    with engine._lock:
        for slot in held:
            engine.cache.release(slot)
    assert http.put(f"{server}/admin/slots", headers=ADMIN, json={"n_slots": 3}).json()["n_slots"] == 3
    assert served(server, ROUTED[2]) == served(server, ROUTED[2]) and served(server, ROUTED[0]) == text
    for body, status in (({"n_slots": 2}, 400), ({"n_slots": "many"}, 400), ({}, 400), ({"n_slots": 10**6}, 400)):
        assert http.put(f"{server}/admin/slots", headers=ADMIN, json=body).status_code == status
    assert http.put(f"{server}/admin/slots", json={"n_slots": 8}).status_code == 401
    assert engine.stats().slots == 3
