"""Multi-slot LoRA: every path (torch ops, and the compiled CPU op that adds the adapters in the frozen
weight's pass) against the row-by-row reference, and slot 0 = the base output."""

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from server.model import cpu_kernel
from server.model.layers import BatchedLoRALinear, PanelLinear, SlotContext
from server.model.lora_ops import SlotPlan, add_lora, lora_reference

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
def panel_op():
    op = cpu_kernel.panel_linear()
    assert op is not None, "the CPU kernels did not build: is a C++ compiler (g++) installed?"
    return op


def fused(op, x, A, B, slots, bias=True, seed=3):
    """base and base + each row's adapter by the compiled op, for a random linear d_in -> d_out."""
    torch.manual_seed(seed)
    linear = nn.Linear(x.shape[-1], B.shape[-1], bias=bias).to(x.dtype)
    packed = PanelLinear(linear, op)
    return linear, packed(x), packed(x, A, B, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [4, 8, 16, 64, 5])  # the compiled ranks and one for the generic loop
@pytest.mark.parametrize("tokens", [1, 3])
def test_compiled_op_adds_each_rows_adapter_like_the_reference(panel_op, rank, tokens, dtype):
    g = torch.Generator().manual_seed(rank)
    d_in, d_out = 23, 37  # not multiples of the kernel's unrolling; a partial last panel
    # slots as the model holds them: one layer's view of a shape group's storage [G, S, d_in, r]
    A = torch.randn(3, S, d_in, rank, generator=g)[1].to(dtype)
    B = torch.randn(3, S, rank, d_out, generator=g)[1].to(dtype)
    A[0], B[0] = 0, 0
    slots = torch.tensor([3, 0, 5, 3, 1])
    x = inputs(len(slots), tokens, d_in, seed=rank).to(dtype)
    linear, base, got = fused(panel_op, x, A, B, slots)
    assert got.dtype == dtype
    want = x.double() @ linear.weight.double().T + linear.bias.double()
    want += lora_reference(x.double(), A.double(), B.double(), slots)
    assert_close(got, want, dtype)
    assert torch.equal(got[1], base[1])  # slot 0: exactly the frozen layer


def test_compiled_op_gives_a_row_the_same_bits_alone_in_any_batch_and_on_any_threads(panel_op):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(S, 512, 8, generator=g), torch.randn(S, 8, 700, generator=g)  # a layer split over threads
    A[0], B[0] = 0, 0
    slots = torch.tensor([1, 2, 3, 4, 5, 0, 1, 2] * 4)
    x = inputs(len(slots), 1, 512)
    threads, outputs = torch.get_num_threads(), []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            linear, _, got = fused(panel_op, x, A, B, slots, bias=False)
            outputs.append(got)
    finally:
        torch.set_num_threads(threads)
    assert_close(outputs[0], linear(x).double() + lora_reference(x.double(), A.double(), B.double(), slots),
                 torch.float32)
    assert torch.equal(outputs[0], outputs[1])
    packed = PanelLinear(linear, panel_op)
    alone = torch.cat([packed(x[i:i + 1], A, B, slots[i:i + 1]) for i in range(len(slots))])
    assert torch.equal(alone, outputs[0])
    prefill = torch.cat([x, inputs(len(slots), 79, 512, seed=9)], 1)  # 80 tokens a row: the many-rows path
    assert torch.equal(packed(prefill, A, B, slots)[:, :1], outputs[0])


def test_compiled_op_rejects_adapters_it_cannot_add(panel_op):
    A, B = slot_tensors()
    packed = PanelLinear(nn.Linear(D_IN, D_OUT), panel_op)
    x, y, slots = inputs(4, D_IN), torch.empty(4, D_OUT), torch.tensor([1, 2, 3, 4])
    args = (y, x, packed.panels, packed.bias)
    with pytest.raises(RuntimeError, match="float32"):
        panel_op(*args, A.double(), B.double(), slots)
    with pytest.raises(RuntimeError, match="out of range"):
        panel_op(*args, A, B, torch.tensor([1, 2, 3, S]))
    with pytest.raises(RuntimeError, match="cannot be split"):
        panel_op(*args, A, B, torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="contiguous matrix"):
        panel_op(*args, A.transpose(1, 2).contiguous().transpose(1, 2), B, slots)
    with pytest.raises(RuntimeError, match="adapter shapes"):
        panel_op(*args, A[:, :-1], B, slots)
    with pytest.raises(RuntimeError, match="together"):
        panel_op(*args, A, B, None)


def test_cpu_kernel_falls_back_when_it_cannot_be_built(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MHR_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="server.model.cpu_kernel"):
        assert cpu_kernel._build() is False
    assert "CPU kernels unavailable" in caplog.text and "cpu_kernel=false" in caplog.text


def test_cpu_kernel_falls_back_when_a_source_is_missing(tmp_path, monkeypatch, caplog):
    # an install that left out a header (simd.h was once missing from the wheel) must not stop the start
    monkeypatch.setenv("MHR_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "HEADERS", [tmp_path / "missing.h"])
    with caplog.at_level(logging.WARNING, logger="server.model.cpu_kernel"):
        assert cpu_kernel._build() is False
    assert "CPU kernels unavailable" in caplog.text and "missing.h" in caplog.text


def test_cpu_kernel_build_survives_a_build_that_was_killed(tmp_path):
    # torch's loader guards a build with a lock file; a build killed midway leaves it behind, and the next
    # process would wait for it forever. Here a build directory (a copy of the real one) with that file in it.
    built = cpu_kernel.build_directory()
    name = built.name
    assert cpu_kernel.panel_linear() is not None and built.is_dir()
    shutil.copytree(built, tmp_path / name)
    (tmp_path / name / "lock").touch()
    load = "from server.model import cpu_kernel; assert cpu_kernel.panel_linear() is not None"
    done = subprocess.run([sys.executable, "-c", load], env=os.environ | {"MHR_KERNEL_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / name / "lock").exists()


def test_cpu_kernel_builds_are_kept_per_environment(tmp_path):
    # Two virtual environments (.venv, .venv-vllm) with the same torch version: their build files name
    # different torch paths, so a shared build directory would be rebuilt each time the other one loads.
    here = cpu_kernel.environment()
    assert cpu_kernel.build_name(here) == cpu_kernel.build_name() and here["prefix"] == sys.prefix
    names = {cpu_kernel.build_name({**here, key: "other"}) for key in here}
    assert len(names | {cpu_kernel.build_name(here)}) == len(here) + 1  # each part of the key counts
    other = {**here, "prefix": str(tmp_path / ".venv-vllm")}
    assert cpu_kernel.build_directory(other).parent == cpu_kernel.build_directory().parent
    assert cpu_kernel.build_directory(other) != cpu_kernel.build_directory()

    # this environment's build beside another's: loading it here neither rebuilds it nor touches the other
    assert cpu_kernel.panel_linear() is not None
    mine = shutil.copytree(cpu_kernel.build_directory(), tmp_path / cpu_kernel.build_name())
    theirs = tmp_path / cpu_kernel.build_name(other)
    theirs.mkdir()
    (theirs / "build.ninja").write_text(f"# names {other['prefix']}\n")
    before = {path: path.stat().st_mtime_ns for path in [*mine.iterdir(), *theirs.iterdir()]
              if path.name != "build.flock"}  # the lock file is opened for writing on every load
    load = "from server.model import cpu_kernel; assert cpu_kernel.panel_linear() is not None"
    done = subprocess.run([sys.executable, "-c", load], env=os.environ | {"MHR_KERNEL_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {path: path.stat().st_mtime_ns for path in before} == before


@settings(max_examples=60, deadline=None)
@given(slots=st.lists(st.integers(0, S - 1), min_size=1, max_size=9), tokens=st.integers(1, 4),
       compiled=st.booleans())
@example(slots=[2, 0, 2, 4, 1], tokens=4, compiled=False)  # mixed, a bare row, a slot used twice
@example(slots=[3, 3, 3, 3, 3], tokens=1, compiled=True)  # one slot for every row
@example(slots=[0, 0, 0, 0, 0], tokens=1, compiled=True)  # no adapter at all
@example(slots=[5, 5, 5, 1, 0], tokens=4, compiled=False)  # uneven groups
@example(slots=[5, 0, 2, 2, 1], tokens=1, compiled=True)  # mixed decode
def test_any_batch_matches_reference_and_leaves_bare_rows_alone(panel_op, slots, tokens, compiled):
    """Through the layer the model holds, on the frozen layer as loaded (torch ops) or packed (compiled op)."""
    A, B = slot_tensors()
    x = inputs(len(slots), tokens, D_IN, seed=6)
    torch.manual_seed(7)
    linear = nn.Linear(D_IN, D_OUT)
    context = SlotContext()
    layer = BatchedLoRALinear(PanelLinear(linear, panel_op) if compiled else linear, A, B, context)
    context.plan = SlotPlan.of(slots, "cpu")
    with torch.no_grad():
        got, base = layer(x), layer.base(x)
    want = linear(x).double() + lora_reference(x.double(), A.double(), B.double(), context.plan.rows)
    assert_close(got, want, torch.float32)
    bare = [i for i, s in enumerate(slots) if s == 0]
    assert torch.equal(got[bare], base[bare])


def test_panel_linear_is_differentiable_in_its_input_and_wrapped_by_mhr(panel_op):
    """An adaptation job backpropagates through the packed weights: gradients equal nn.Linear's, and an MHR
    layer wraps the packed layer as it wraps the nn.Linear (same output, same gradient of its logits)."""
    import mhr
    linear = nn.Linear(D_IN, D_OUT)
    packed = PanelLinear(linear, panel_op)
    assert torch.equal(packed.weight(), linear.weight)
    x = inputs(3, 5, D_IN).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    (packed(x) ** 2).sum().backward()
    (linear(x_ref) ** 2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    config = mhr.MHRConfig(n_skills=3, n_heads=2, rank=2, target_modules=["layer"])
    grads = []
    for base in (linear, packed):
        torch.manual_seed(0)
        model = nn.ModuleDict({"layer": base})
        layer = mhr.inject(model, config, n_tasks=1)["layer"]
        with torch.no_grad():
            layer.lora_B.normal_()
        with mhr.use_tasks(model, 0):
            layer(inputs(3, 5, D_IN)).square().sum().backward()
        grads.append(layer.router.logits.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4)
