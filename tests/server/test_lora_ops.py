"""The multi-slot LoRA op: every fast path against the row-by-row reference, and slot 0 = the base output."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.lora_ops import SlotPlan, add_lora, lora_by_slot, lora_reference

S, D_IN, R, D_OUT = 6, 24, 3, 20


def slot_tensors(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(S, D_IN, R, generator=g).to(dtype)
    B = torch.randn(S, R, D_OUT, generator=g).to(dtype)
    A[0], B[0] = 0, 0  # slot 0 is the empty adapter
    return A, B


def inputs(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_close(got, want, dtype):
    # bf16 rounds the rank-r intermediate too: allow a few bf16 ulps of the output's scale
    error = (got.double() - want).abs().max()
    assert error <= (1e-5 if dtype == torch.float32 else 2e-2) * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 1), (3, 5)])  # decode rows [N, 1, d] and prefill rows [N, L, d]
def test_grouped_path_matches_reference(dtype, shape):
    A, B = slot_tensors(dtype)
    x = inputs(*shape, D_IN).to(dtype)
    slots = [1, 0, 4, 1, 2, 5, 0][: shape[0]]
    plan = SlotPlan.of(slots, "cpu")
    want = lora_reference(x.double(), A.double(), B.double(), plan.rows)
    assert_close(lora_by_slot(x, A, B, plan), want if plan.adapted is None else want[plan.adapted], dtype)


def test_slot_zero_rows_get_exactly_the_base_output():
    A, B = slot_tensors()
    for tokens in (1, 3):
        x, base = inputs(6, tokens, D_IN, seed=4), inputs(6, tokens, D_OUT, seed=5)
        got = add_lora(base.clone(), x, A, B, SlotPlan.of([0, 3, 0, 1, 0, 3], "cpu"))  # adds in place
        assert torch.equal(got[[0, 2, 4]], base[[0, 2, 4]])
        assert not torch.allclose(got[[1, 3, 5]], base[[1, 3, 5]])
    assert add_lora(base, x, A, B, SlotPlan.of([0] * 6, "cpu")) is base  # no adapter: no work at all


def test_plan_groups_rows_by_slot():
    assert SlotPlan.of([2, 2, 2], "cpu").uniform == 2
    plan = SlotPlan.of([4, 0, 2, 4, 4], "cpu")  # slots 2..4, up to 3 rows a slot
    assert plan.uniform is None and (plan.first, plan.span, plan.per_slot) == (2, 3, 3)
    assert plan.adapted.tolist() == [0, 2, 3, 4]                  # row 1 has no adapter: never touched
    assert SlotPlan.of([4, 2, 4], "cpu").adapted is None           # every row has one
    members = plan.members.view(3, 3)
    assert members[0, 0] == 2 and members[2].tolist() == [0, 3, 4]  # slot 2: row 2; slot 4: rows 0, 3, 4
    assert [members.flatten()[p].item() for p in plan.places.tolist()] == plan.adapted.tolist()


@settings(max_examples=60, deadline=None)
@given(slots=st.lists(st.integers(0, S - 1), min_size=1, max_size=9), tokens=st.integers(1, 4))
@example(slots=[2, 0, 2, 4, 1], tokens=4)  # mixed, a bare row, a slot used twice
@example(slots=[3, 3, 3, 3, 3], tokens=1)  # one slot for every row
@example(slots=[0, 0, 0, 0, 0], tokens=1)  # no adapter at all
@example(slots=[5, 5, 5, 1, 0], tokens=4)  # uneven groups
def test_any_batch_matches_reference_and_leaves_bare_rows_alone(slots, tokens):
    A, B = slot_tensors()
    x, base = inputs(len(slots), tokens, D_IN, seed=6), inputs(len(slots), tokens, D_OUT, seed=7)
    plan = SlotPlan.of(slots, "cpu")
    got = add_lora(base.clone(), x, A, B, plan)
    want = base.double() + lora_reference(x.double(), A.double(), B.double(), plan.rows)
    assert_close(got, want, torch.float32)
    bare = [i for i, s in enumerate(slots) if s == 0]
    assert torch.equal(got[bare], base[bare])
