"""mhr.bundle: atomic saves, concurrent writers, read-only readers."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

import mhr
import mhr.bundle
from mhr import Bundle, BundleError
from tests.mhr.bundles import (
    CONFIG,
    DENSE_MODULES,
    MODULES,
    TASKS,
    assert_routing_rows,
    assert_same_bundle,
    assert_same_tensors,
    files_in,
    listed_files,
    random_logits,
    random_lora,
    stored_path,
)

# ----- atomic saves, concurrent writers, read-only readers ------------------------------------------

def change_every_file(bundle: Bundle) -> None:
    """Change what each of the four tensor files holds, and drop one adapter file."""
    bundle.lora_B = {m: t + 1.0 for m, t in bundle.lora_B.items()}
    bundle.add_routed_task("delta", random_logits(13))
    bundle.add_dense_task("dense-1", random_lora(DENSE_MODULES, 2, 4.0, seed=13), replace=True)
    bundle.set_zero_shot(random_lora(MODULES, 4, 8.0, seed=14))
    bundle.remove_task("dense-bf16")


def test_a_second_writer_from_the_same_revision_is_refused(saved):
    first, second = Bundle.load(saved), Bundle.load(saved)
    first.add_routed_task("delta", random_logits(14))
    first.save(saved)
    second.remove_task("beta")
    with pytest.raises(BundleError) as e:
        second.save(saved)
    assert "manifest.json" in str(e.value)
    assert f"on disk is at revision {first.revision}" in str(e.value)
    assert f"loaded at revision {second.revision}" in str(e.value)
    loaded = Bundle.load(saved)
    assert_same_bundle(loaded, first)
    assert loaded.revision == first.revision == second.revision + 1


def test_a_new_bundle_does_not_overwrite_a_saved_one(built, saved):
    fresh = Bundle.from_model(built.model, CONFIG, "tiny", tasks=TASKS)
    with pytest.raises(BundleError, match="revision"):
        fresh.save(saved)
    assert_same_bundle(Bundle.load(saved), built.bundle)


def test_saves_bump_the_revision(bundle, saved):
    start = bundle.revision
    bundle.save(saved)
    bundle.save(saved)  # the same copy may save again: it holds the revision it wrote
    assert bundle.revision == start + 2 == Bundle.load(saved).revision


def test_successful_save_leaves_no_temporary_or_stale_files(bundle, saved):
    before = files_in(saved)
    assert before == listed_files(saved) and len(before) == 7
    change_every_file(bundle)
    bundle.save(saved)
    after = files_in(saved)
    assert after == listed_files(saved) and len(after) == 6  # dense-bf16 removed
    assert after & before == {".lock", "manifest.json"}  # every tensor file changed


def test_save_deletes_leftovers_of_an_interrupted_save(bundle, saved):
    leftovers = ["inventory.0123456789abcdef.safetensors", "adapters/gone.fedcba9876543210.safetensors"]
    for rel in leftovers:
        (saved / rel).write_bytes(b"half written")
    (saved / "NOTES.txt").write_text("not ours")  # only tensor files are cleaned up
    bundle.save(saved)
    assert files_in(saved) == listed_files(saved) | {"NOTES.txt"}


def test_first_save_keeps_foreign_tensor_files(built, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(save_safetensors({"w": torch.ones(2)}))
    Bundle.load(built.path).save(out)
    assert (out / "model.safetensors").is_file()


def test_unchanged_files_are_not_rewritten(bundle, saved, monkeypatch):
    inventory = stored_path(saved, "inventory.safetensors")
    written = []
    real = mhr.bundle.write_atomic
    monkeypatch.setattr(mhr.bundle, "write_atomic", lambda p, d: written.append(p) or real(p, d))
    bundle.add_routed_task("delta", random_logits(15))
    bundle.save(saved)
    assert written == [stored_path(saved, "routing.safetensors"), saved / "manifest.json"]
    assert stored_path(saved, "inventory.safetensors") == inventory and inventory.is_file()


N_WRITES = 5  # change_every_file: inventory, routing, dense-1, zero-shot, then the manifest


class Failure(OSError):
    pass


def fail_on_call(n: int, real: Callable) -> Callable:
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == n + 1:
            raise Failure(28, "No space left on device (simulated)")
        return real(*args, **kwargs)

    failing.calls = calls
    return failing


@pytest.mark.parametrize("target", ["write_atomic", "os.replace"])
@pytest.mark.parametrize("n", range(N_WRITES))
def test_a_save_that_fails_midway_keeps_the_old_bundle(built, bundle, saved, monkeypatch, target, n):
    change_every_file(bundle)
    changed = Bundle.load(saved)
    change_every_file(changed)
    if target == "write_atomic":
        failing = fail_on_call(n, mhr.bundle.write_atomic)
        monkeypatch.setattr(mhr.bundle, "write_atomic", failing)
    else:
        failing = fail_on_call(n, os.replace)
        monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(Failure):
        bundle.save(saved)
    monkeypatch.undo()
    assert len(failing.calls) == n + 1
    assert_same_bundle(Bundle.load(saved), built.bundle)
    assert not any(name.endswith(".tmp") for name in files_in(saved))
    bundle.save(saved)  # the failed save left this copy able to retry
    assert_same_bundle(Bundle.load(saved), changed)
    assert files_in(saved) == listed_files(saved)  # and the retry removed what the failed one wrote


def test_metadata_that_is_not_json_fails_before_any_file_changes(built, bundle, saved):
    bundle.lora_B = {m: t + 1.0 for m, t in bundle.lora_B.items()}
    bundle.training["lr"] = torch.tensor(0.1)
    with pytest.raises(TypeError, match="JSON serializable"):
        bundle.save(saved)
    assert_same_bundle(Bundle.load(saved), built.bundle)
    assert files_in(saved) == listed_files(saved)  # not even an orphan tensor file was written
    del bundle.training["lr"]
    bundle.save(saved)  # and this copy can still save
    assert_same_tensors(Bundle.load(saved).lora_B, bundle.lora_B)


def test_load_from_a_read_only_directory(built, saved):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions: see test_load_when_the_lock_file_cannot_be_created")
    (saved / ".lock").unlink()
    for d in (saved / "adapters", saved):
        d.chmod(0o555)
    try:
        assert_same_bundle(Bundle.load(saved), built.bundle)
        assert not (saved / ".lock").exists()
    finally:
        for d in (saved, saved / "adapters"):
            d.chmod(0o755)


def test_load_when_the_lock_file_cannot_be_created(built, saved, monkeypatch):
    (saved / ".lock").unlink()

    def open_without_lock(file, *args, **kwargs):
        if Path(file).name == ".lock":
            raise PermissionError(30, "Read-only file system", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(mhr.bundle, "open", open_without_lock, raising=False)
    loaded = Bundle.load(saved)
    assert_same_bundle(loaded, built.bundle)
    assert not (saved / ".lock").exists()
    with pytest.raises(PermissionError):  # a writer never goes without the lock
        loaded.save(saved)


def test_a_bundle_built_from_per_module_routing_tables_rows_them_by_task(bundle, built):
    def rebuilt(routing):
        return Bundle(config=bundle.config, backbone=bundle.backbone, fingerprint=bundle.fingerprint,
                      modules=bundle.modules, lora_A=bundle.lora_A, lora_B=bundle.lora_B, tasks=list(bundle.tasks),
                      routing=routing, adapters=bundle.adapters)

    copy = rebuilt({m: t.clone() for m, t in bundle.routing.items()})
    assert_routing_rows(copy, {t: built.logits[t] for t in TASKS})
    missing = next(iter(bundle.modules))
    with pytest.raises(BundleError, match=f"routing logits name modules .*{missing}"):
        rebuilt({m: t for m, t in bundle.routing.items() if m != missing})
