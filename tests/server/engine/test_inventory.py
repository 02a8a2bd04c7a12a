"""Adapters in slot layout equal mhr's materialization (routed, MHR-mu average, dense), scaling folded in B,
whether materialized by torch ops or mixed by the compiled op straight into (rank-padded) slot storage."""

import pytest
import torch

import mhr
from server.engine.inventory import ServingInventory
from server.model import cpu_kernel
from server.model.layers import SlotGroup, SlotWeights
from tests.server.conftest import DENSE, ROUTED


@pytest.fixture
def bundle(bundle_path):
    return mhr.Bundle.load(bundle_path)


def grouped(bundle):
    """Group modules by shape as the slot storage does."""
    groups = {}
    for name, dims in bundle.modules.items():
        groups.setdefault(dims, []).append(name)
    return list(groups.values())


def assert_matches(adapter, groups, lora):
    for names, (A, B) in zip(groups, adapter, strict=True):
        for i, name in enumerate(names):
            want_A = lora.A.get(name, torch.zeros(A.shape[1:]))
            want_B = lora.B[name] * lora.scaling if name in lora.B else torch.zeros(B.shape[1:])
            assert torch.allclose(A[i], want_A, atol=1e-6) and torch.allclose(B[i], want_B, atol=1e-6)


@pytest.fixture(scope="module")
def mix_op():
    op = cpu_kernel.mix_skills()
    assert op is not None, "the CPU kernels did not build (needs g++)"
    return op


def test_routed_average_and_dense_match_mhr(bundle):
    groups = grouped(bundle)
    inventory = ServingInventory(bundle, groups, "cpu", torch.float32)
    reference = bundle.inventory()
    for task in ROUTED[:3]:
        assert_matches(inventory.routed(bundle.routing_row(task)).tensors(), groups,
                       bundle.task_lora(task, reference))
    assert_matches(inventory.average().tensors(), groups, reference.average())
    assert_matches(inventory.dense(bundle.adapters[DENSE]), groups, bundle.adapters[DENSE])


@pytest.mark.parametrize("max_rank", [4, 6])  # the inventory's rank, and slots wider than it (zero-padded)
@pytest.mark.parametrize("compiled", [False, True])
def test_adapters_written_into_slots_match_mhr(bundle, mix_op, max_rank, compiled):
    groups = grouped(bundle)
    inventory = ServingInventory(bundle, groups, "cpu", torch.float32, mix_op if compiled else None)
    storage = [SlotGroup(names, torch.full((len(names), 3, bundle.modules[names[0]][0], max_rank), float("nan")),
                         torch.full((len(names), 3, max_rank, bundle.modules[names[0]][1]), float("nan")))
               for names in groups]
    slots = SlotWeights(storage, {})
    reference = bundle.inventory()
    cases = [(inventory.routed(bundle.routing_row(task)), bundle.task_lora(task, reference)) for task in ROUTED[:3]]
    cases.append((inventory.average(), reference.average()))
    for adapter, want in cases:
        slots.write(2, adapter)
        r = want.rank
        assert_matches([(g.A[:, 2, :, :r], g.B[:, 2, :r]) for g in storage], groups, want)
        assert all((g.A[:, 2, :, r:] == 0).all() and (g.B[:, 2, r:] == 0).all() for g in storage)
        assert all(g.A[:, 1].isnan().all() and g.B[:, 1].isnan().all() for g in storage), "another slot was written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols", [(4, 5), (3, 64), (8, 25), (8, 344), (344, 8)])
def test_compiled_mix_equals_einsum_into_strided_rows(mix_op, rows, cols, dtype):
    """Blocks of whole and partial 64-float chunks, rows crossing chunk ends, written into wider rows;
    bfloat16 sums in float32, rounded once."""
    g = torch.Generator().manual_seed(rows * cols)
    src, w = torch.randn(2, 3, 5, rows, cols, generator=g).to(dtype), torch.rand(2, 3, 5, generator=g).to(dtype)
    storage = torch.full((2, 3, rows, cols + 7), float("nan"), dtype=dtype)
    mix_op([storage[..., :cols]], [src], [w])
    want = torch.einsum("ghk,ghkrc->ghrc", w.double(), src.double())
    if dtype == torch.float32:
        torch.testing.assert_close(storage[..., :cols], want.float())
    else:  # the exact sum rounded to bfloat16, up to float32 rounding just below a tie
        torch.testing.assert_close(storage[..., :cols], want.to(dtype), rtol=2**-8, atol=1e-6)
    assert storage[..., cols:].isnan().all(), "the op wrote past its rows"


def test_compiled_mix_sums_every_triple_and_refuses_what_it_cannot_compute(mix_op):
    out, src, w = torch.zeros(2, 3, 4, 5), torch.ones(2, 3, 6, 4, 5), torch.ones(2, 3, 6)
    wide = torch.zeros(1, 2, 1, 100_000)  # enough work for both threads, split mid-way through a tensor
    mix_op([out, wide], [src, torch.arange(4 * 100_000.0).view(1, 2, 2, 1, 100_000)], [w, torch.ones(1, 2, 2)])
    assert torch.equal(out, torch.full_like(out, 6.0))
    assert torch.equal(wide.flatten(), torch.arange(4 * 100_000.0).view(2, 2, -1).sum(1).flatten())
    with pytest.raises(RuntimeError, match="float32"):
        mix_op([out.double()], [src.double()], [w.double()])
    with pytest.raises(RuntimeError, match="shapes"):
        mix_op([out], [src], [torch.ones(2, 3, 5)])
    with pytest.raises(RuntimeError, match="contiguous"):
        mix_op([out.transpose(2, 3).contiguous().transpose(2, 3)], [src], [w])
    with pytest.raises(RuntimeError, match="length"):
        mix_op([out, out], [src], [w])


def test_bfloat16_layout_and_mixing_into_slots(bundle, mix_op):
    groups = grouped(bundle)
    inventory = ServingInventory(bundle, groups, "cpu", torch.bfloat16)
    A, B = inventory.routed(bundle.routing_row(ROUTED[0])).tensors()[0]
    assert A.dtype == B.dtype == torch.bfloat16 and A.shape[-1] == B.shape[-2] == bundle.config.rank
    compiled = ServingInventory(bundle, groups, "cpu", torch.bfloat16, mix_op)
    storage = [SlotGroup(names, torch.zeros(len(names), 2, bundle.modules[names[0]][0], 4, dtype=torch.bfloat16),
                         torch.zeros(len(names), 2, 4, bundle.modules[names[0]][1], dtype=torch.bfloat16))
               for names in groups]
    for task in ROUTED[:2]:
        SlotWeights(storage, {}).write(1, compiled.routed(bundle.routing_row(task)))
        for g, (A, B) in zip(storage, inventory.routed(bundle.routing_row(task)).tensors(), strict=True):
            # the same bfloat16 skills and weights; torch's bmm rounds as the op does, up to one unit
            torch.testing.assert_close(g.A[:, 1], A, rtol=2**-7, atol=1e-6)
            torch.testing.assert_close(g.B[:, 1], B, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_mix_of_several_tasks_equals_each_mixed_alone(mix_op, dtype):
    """One call for three tasks and two sources (each source read once) writes each task's sums, the same bits
    as a call for that task alone, into strided rows; two threads split the work mid-way."""
    g = torch.Generator().manual_seed(7)
    srcs = [torch.randn(2, 3, 5, 8, 344, generator=g).to(dtype), torch.randn(1, 4, 5, 300, 8, generator=g).to(dtype)]
    ws = [[torch.rand(*src.shape[:3], generator=g).to(dtype) for src in srcs] for _ in range(3)]  # [task][src]

    def storage(src):
        G, H, _, R, C = src.shape
        return torch.full((G, H, R, C + 3), float("nan"), dtype=dtype)

    together = [[storage(src) for src in srcs] for _ in range(3)]
    mix_op([together[t][i][..., :-3] for i in range(2) for t in range(3)], srcs,
           [ws[t][i] for i in range(2) for t in range(3)])
    for t in range(3):
        alone = [storage(src) for src in srcs]
        mix_op([out[..., :-3] for out in alone], srcs, ws[t])
        for i, src in enumerate(srcs):
            assert torch.equal(together[t][i][..., :-3], alone[i][..., :-3]), f"task {t}, source {i}"
            assert together[t][i][..., -3:].isnan().all(), "the op wrote past its rows"
            want = torch.einsum("ghk,ghkrc->ghrc", ws[t][i].double(), src.double()).to(dtype)
            torch.testing.assert_close(together[t][i][..., :-3], want, rtol=2**-8, atol=1e-5)


def test_compiled_mix_refuses_outs_of_one_source_with_different_strides(mix_op):
    src, w = torch.ones(1, 2, 3, 4, 5), torch.ones(1, 2, 3)
    with pytest.raises(RuntimeError, match="same strides"):
        mix_op([torch.zeros(1, 2, 4, 5), torch.zeros(1, 2, 4, 6)[..., :5]], [src], [w, w])


@pytest.mark.parametrize("compiled", [False, True])
def test_adapters_written_together_equal_each_written_alone(bundle, mix_op, compiled):
    """`write_many` (a burst of cold tasks: routed, the average, a dense LoRA) leaves every slot as `write`
    does one adapter at a time, bit for bit, and refuses a bad burst before touching any slot."""
    groups = grouped(bundle)
    inventory = ServingInventory(bundle, groups, "cpu", torch.float32, mix_op if compiled else None)

    def storage():
        return [SlotGroup(names, torch.full((len(names), 6, bundle.modules[names[0]][0], 6), float("nan")),
                          torch.full((len(names), 6, 6, bundle.modules[names[0]][1]), float("nan")))
                for names in groups]

    adapters = [inventory.routed(bundle.routing_row(task)) for task in ROUTED[:3]]
    adapters += [inventory.average(), inventory.dense(bundle.adapters[DENSE])]
    together, alone = storage(), storage()
    SlotWeights(together, {}).write_many(list(zip(range(1, 6), adapters, strict=True)))
    for slot, adapter in zip(range(1, 6), adapters, strict=True):
        SlotWeights(alone, {}).write(slot, adapter)
    for t, a in zip(together, alone, strict=True):
        assert torch.equal(t.A[:, 1:], a.A[:, 1:]) and torch.equal(t.B[:, 1:], a.B[:, 1:])
    assert not torch.equal(together[0].A[:, 1], together[0].A[:, 2]), "two tasks wrote the same adapter"
    slots = SlotWeights(storage(), {})
    for bad, says in [([(1, adapters[0]), (1, adapters[1])], "two adapters for one slot"),
                      ([(1, adapters[0]), (6, adapters[1])], "not a writable slot")]:
        with pytest.raises(ValueError, match=says):
            slots.write_many(bad)
        assert all(g.A.isnan().all() and g.B.isnan().all() for g in slots.groups), "a refused burst wrote a slot"
