"""The vLLM engine's adapter-directory cache (no vLLM needed): ids, LRU eviction, pins, deferred unloads."""

from __future__ import annotations

import torch

import mhr
from server.engine.tasks import AdapterKey, TaskRegistry
from server.vllm_backend.adapters import AdapterDirs, PeftInventory, zero_lora
from tests.server.conftest import DENSE, ROUTED


def lora_of(bundle, task):
    return lambda: PeftInventory(bundle).routed(bundle.routing_row(task))


def test_task_registry_on_peft_inventory_loads_the_tasks_mhr_materializes(bundle_path):
    """What the vLLM engine writes for a task: routed and dense tasks, and the zero-shot average."""
    bundle = mhr.Bundle.load(bundle_path)
    tasks = TaskRegistry(bundle, PeftInventory(bundle), allow_zero_shot=True)
    cases = [(tasks.resolve(name), bundle.task_lora(name)) for name in [*ROUTED[:2], DENSE]]
    cases.append((tasks.resolve("never-seen"), bundle.zero_shot_lora()))
    for key, want in cases:
        got = tasks.load(key)
        assert all(torch.allclose(got.delta_weight(m), want.delta_weight(m), atol=1e-6) for m in want.modules)


def test_idle_adapters_are_evicted_lru_and_used_ones_never(tmp_path, bundle_path):
    bundle = mhr.Bundle.load(bundle_path)
    dirs = AdapterDirs(tmp_path / "a", capacity=2, base_model="m")
    keys = [AdapterKey(t, 1) for t in ROUTED[:4]]
    pinned, evicted = dirs.add(AdapterKey("zero-shot", 1), lambda: zero_lora(bundle.modules), pinned=True)
    assert evicted == [] and pinned.refs == 0 and (pinned.path / "adapter_config.json").exists()
    a, _ = dirs.add(keys[0], lora_of(bundle, ROUTED[0]))
    b, evicted = dirs.add(keys[1], lora_of(bundle, ROUTED[1]))
    assert evicted == [] and len({pinned.lora_id, a.lora_id, b.lora_id}) == 3    # over capacity: all in use
    assert dirs.release(keys[0]) == [a]                                          # idle and over capacity
    assert dirs.lookup(keys[0]) is None and dirs.lookup(keys[1]) is b and b.refs == 2
    assert dirs.release(keys[1]) == [] and dirs.release(keys[1]) == []          # capacity 2: pin + b fit
    c, evicted = dirs.add(keys[2], lora_of(bundle, ROUTED[2]))
    assert evicted == [b] and set(dirs.resident()) == {pinned.key, keys[2]}     # the pin is never evicted
    assert (dirs.stats.hits, dirs.stats.misses, dirs.stats.evictions) == (1, 1, 2)
    written, want = mhr.import_peft(c.path), lora_of(bundle, ROUTED[2])()
    assert all(torch.allclose(written.delta_weight(m), want.delta_weight(m), atol=1e-6) for m in want.modules)


def test_invalidated_adapters_leave_at_their_last_release(tmp_path, bundle_path):
    bundle = mhr.Bundle.load(bundle_path)
    dirs = AdapterDirs(tmp_path / "a", capacity=8, base_model="m")
    key = AdapterKey(ROUTED[0], 1)
    entry, _ = dirs.add(key, lora_of(bundle, ROUTED[0]))
    assert dirs.lookup(key) is entry and entry.refs == 2
    assert dirs.invalidate(key) == [] and dirs.release(key) == []
    assert dirs.release(key) == [entry] and dirs.get(key) is None
    dirs.delete_files([entry])
    assert not entry.path.exists()
    pin, _ = dirs.add(AdapterKey("zero-shot", 2), lambda: zero_lora(bundle.modules), pinned=True)
    assert dirs.invalidate(pin.key) == [pin]                                      # a pin goes when invalidated
    dirs.close()
    assert not (tmp_path / "a").exists()
