"""The multi-slot LoRA op: every fast path (the compiled CPU kernel included) against the row-by-row
reference, and slot 0 = the base output."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server import cpu_kernel
from server.lora_ops import SlotPlan, add_lora, lora_reference

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
def test_gathered_path_matches_reference(dtype, shape):
    A, B = slot_tensors(dtype)
    x, base = inputs(*shape, D_IN).to(dtype), inputs(*shape, D_OUT, seed=2).to(dtype)
    plan = SlotPlan.of([1, 0, 4, 1, 2, 5, 0][: shape[0]], "cpu")
    want = base.double() + lora_reference(x.double(), A.double(), B.double(), plan.rows)
    assert_close(add_lora(base.clone(), x, A, B, plan), want, dtype)


def test_slot_zero_rows_get_exactly_the_base_output():
    A, B = slot_tensors()
    for tokens in (1, 3):
        x, base = inputs(6, tokens, D_IN, seed=4), inputs(6, tokens, D_OUT, seed=5)
        got = add_lora(base.clone(), x, A, B, SlotPlan.of([0, 3, 0, 1, 0, 3], "cpu"))  # adds in place
        assert torch.equal(got[[0, 2, 4]], base[[0, 2, 4]])
        assert not torch.allclose(got[[1, 3, 5]], base[[1, 3, 5]])
    assert add_lora(base, x, A, B, SlotPlan.of([0] * 6, "cpu")) is base  # no adapter: no work at all


def test_plan_knows_when_every_row_shares_a_slot():
    assert SlotPlan.of([2, 2, 2], "cpu").uniform == 2
    assert SlotPlan.of([0, 0], "cpu").uniform == 0 and SlotPlan.of([], "cpu").uniform == 0
    plan = SlotPlan.of([4, 0, 2, 4], "cpu")
    assert plan.uniform is None and plan.rows.tolist() == [4, 0, 2, 4] and plan.rows.dtype == torch.long


@pytest.fixture(scope="module")
def row_kernel():
    op = cpu_kernel.lora_rows()
    assert op is not None, "the CPU LoRA kernel did not build: is a C++ compiler (g++) installed?"
    return op


@pytest.mark.parametrize("rank", [4, 8, 16, 64, 5])  # the compiled ranks and one for the generic loop
@pytest.mark.parametrize("tokens", [1, 3])
def test_cpu_kernel_matches_reference(row_kernel, rank, tokens):
    g = torch.Generator().manual_seed(rank)
    d_in, d_out = 23, 37  # not multiples of the kernel's unrolling
    # slots as the model holds them: one layer's view of a shape group's storage [G, S, d_in, r]
    A = torch.randn(3, S, d_in, rank, generator=g)[1]
    B = torch.randn(3, S, rank, d_out, generator=g)[1]
    A[0], B[0] = 0, 0
    slots = [3, 0, 5, 3, 1]
    x, y = inputs(len(slots) * tokens, d_in, seed=rank), inputs(len(slots) * tokens, d_out, seed=rank + 1)
    got = y.clone()
    row_kernel(got, x, A, B, torch.tensor(slots))
    reference = lora_reference(x.view(len(slots), tokens, d_in).double(), A.double(), B.double(), torch.tensor(slots))
    assert_close(got.view(len(slots), tokens, d_out), y.view(len(slots), tokens, d_out).double() + reference,
                 torch.float32)
    assert torch.equal(got.view(len(slots), tokens, d_out)[1], y.view(len(slots), tokens, d_out)[1])  # slot 0


def test_cpu_kernel_splits_large_layers_over_threads_with_the_same_results(row_kernel):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(S, 512, 8, generator=g), torch.randn(S, 8, 700, generator=g)  # ~10k floats a token
    A[0], B[0] = 0, 0
    slots = torch.tensor([1, 2, 3, 4, 5, 0, 1, 2] * 4)
    x, y = inputs(len(slots), 512), inputs(len(slots), 700, seed=2)
    threads, outputs = torch.get_num_threads(), []
    try:
        for n in (2, 1):  # each token is summed alike on any thread: the same bits
            torch.set_num_threads(n)
            outputs.append(y.clone())
            row_kernel(outputs[-1], x, A, B, slots)
    finally:
        torch.set_num_threads(threads)
    assert_close(outputs[0], y.double() + lora_reference(x.double(), A.double(), B.double(), slots), torch.float32)
    assert torch.equal(outputs[0], outputs[1])


def test_cpu_kernel_rejects_what_it_cannot_compute(row_kernel):
    A, B = slot_tensors()
    x, y = inputs(4, D_IN), inputs(4, D_OUT)
    with pytest.raises(RuntimeError, match="float32"):
        row_kernel(y.double(), x.double(), A.double(), B.double(), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(RuntimeError, match="out of range"):
        row_kernel(y, x, A, B, torch.tensor([1, 2, 3, S]))
    with pytest.raises(RuntimeError, match="cannot be split"):
        row_kernel(y, x, A, B, torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="contiguous matrix"):
        row_kernel(y, x, A.transpose(1, 2).contiguous().transpose(1, 2), B, torch.tensor([1, 2, 3, 4]))


def test_cpu_kernel_falls_back_when_it_cannot_be_built(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MHR_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="server.cpu_kernel"):
        assert cpu_kernel._build() is False
    assert "CPU kernels unavailable" in caplog.text and "cpu_kernel=false" in caplog.text


def test_cpu_kernel_build_survives_a_build_that_was_killed(tmp_path):
    # torch's loader guards a build with a lock file; a build killed midway leaves it behind, and the next
    # process would wait for it forever. Here a build directory (a copy of the real one) with that file in it.
    name = cpu_kernel.build_name()
    built = Path(os.environ.get("MHR_KERNEL_DIR", Path.home() / ".cache" / "mhr-serve" / "kernels")) / name
    assert cpu_kernel.lora_rows() is not None and built.is_dir()
    shutil.copytree(built, tmp_path / name)
    (tmp_path / name / "lock").touch()
    load = "from server import cpu_kernel; assert cpu_kernel.lora_rows() is not None"
    done = subprocess.run([sys.executable, "-c", load], env=os.environ | {"MHR_KERNEL_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / name / "lock").exists()


@settings(max_examples=60, deadline=None)
@given(slots=st.lists(st.integers(0, S - 1), min_size=1, max_size=9), tokens=st.integers(1, 4),
       with_kernel=st.booleans())
@example(slots=[2, 0, 2, 4, 1], tokens=4, with_kernel=False)  # mixed, a bare row, a slot used twice
@example(slots=[3, 3, 3, 3, 3], tokens=1, with_kernel=True)  # one slot for every row
@example(slots=[0, 0, 0, 0, 0], tokens=1, with_kernel=True)  # no adapter at all
@example(slots=[5, 5, 5, 1, 0], tokens=4, with_kernel=False)  # uneven groups
@example(slots=[5, 0, 2, 2, 1], tokens=1, with_kernel=True)  # mixed decode: the kernel's case
def test_any_batch_matches_reference_and_leaves_bare_rows_alone(row_kernel, slots, tokens, with_kernel):
    A, B = slot_tensors()
    x, base = inputs(len(slots), tokens, D_IN, seed=6), inputs(len(slots), tokens, D_OUT, seed=7)
    plan = SlotPlan.of(slots, "cpu")
    got = add_lora(base.clone(), x, A, B, plan, row_kernel if with_kernel else None)
    want = base.double() + lora_reference(x.double(), A.double(), B.double(), plan.rows)
    assert_close(got, want, torch.float32)
    bare = [i for i, s in enumerate(slots) if s == 0]
    assert torch.equal(got[bare], base[bare])
