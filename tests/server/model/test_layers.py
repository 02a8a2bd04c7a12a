"""Wrapped linears: slot storage grouped by shape, writing pads ranks exactly, slot 0 is the bare layer; the
frozen weights' layouts (panels for the compiled op, transposed otherwise)."""

import pytest
import torch
from torch import nn

from server.model import cpu_kernel
from server.model.layers import (
    BatchedLoRALinear,
    PanelLinear,
    SlotGroup,
    SlotWeights,
    column_major_weights,
    panel_linears,
    wrap_model,
)
from server.model.lora_ops import SlotPlan


class ThreeLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.mid, self.down = nn.Linear(8, 12), nn.Linear(12, 12), nn.Linear(12, 8)

    def forward(self, x):
        return self.down(self.mid(self.up(x)))


def test_written_slot_equals_base_plus_lora():
    torch.manual_seed(0)
    model = ThreeLinears()
    x = torch.randn(3, 2, 8)
    want_base = model(x)
    context, slots = wrap_model(model, ["up", "mid", "down"], n_slots=4, max_rank=5)
    assert isinstance(model.up, BatchedLoRALinear) and [g.names for g in slots.groups] == [["up"], ["mid"], ["down"]]
    A, B = torch.randn(8, 3), torch.randn(3, 12)  # rank 3 < 5; "mid" and "down" get zeros
    slots.write(2, [(A[None], B[None]), (torch.zeros(1, 12, 3), torch.zeros(1, 3, 12)),
                    (torch.zeros(1, 12, 3), torch.zeros(1, 3, 8))])
    context.plan = SlotPlan.of([0, 2, 2], "cpu")
    got = model(x)
    want_adapted = model.down.base(model.mid.base(model.up.base(x[1:]) + x[1:] @ A @ B))
    assert torch.equal(got[0], want_base[0])
    assert torch.allclose(got[1:], want_adapted, atol=1e-5)
    assert model.up.lora_A.data_ptr() == slots.groups[0].A.data_ptr()  # a view, not a copy
    slots.clear(2)
    assert torch.allclose(model(x), want_base, atol=1e-6)


def test_a_slot_rewritten_at_any_rank_holds_exactly_the_new_adapter():
    """Ranks above the adapter's are zeros whatever the slot held before (NaN storage, higher ranks)."""
    storage = [SlotGroup(["mid"], torch.full((1, 3, 12, 6), float("nan")), torch.full((1, 3, 6, 12), float("nan")))]
    slots = SlotWeights(storage, {})
    for rank in (2, 6, 1, 4, 4, 6):
        A, B = torch.randn(1, 12, rank), torch.randn(1, rank, 12)
        slots.write(1, [(A, B)])
        assert torch.equal(storage[0].A[0, 1], torch.cat([A[0], torch.zeros(12, 6 - rank)], 1))
        assert torch.equal(storage[0].B[0, 1], torch.cat([B[0], torch.zeros(6 - rank, 12)], 0))
        assert storage[0].A[0, 2].isnan().all() and storage[0].B[0, 2].isnan().all()
    slots.clear(1)
    slots.write(1, [(torch.ones(1, 12, 3), torch.ones(1, 3, 12))])
    assert storage[0].A[0, 1].sum() == 36 and storage[0].B[0, 1].sum() == 36


def test_slot_writes_are_checked():
    _, slots = wrap_model(ThreeLinears(), ["mid"], n_slots=3, max_rank=2)
    with pytest.raises(ValueError, match="max rank"):
        slots.write(1, [(torch.zeros(1, 12, 3), torch.zeros(1, 3, 12))])
    with pytest.raises(ValueError, match="writable slot"):
        slots.write(0, [(torch.zeros(1, 12, 2), torch.zeros(1, 2, 12))])
    with pytest.raises(RuntimeError, match="no slot plan"):
        slots.layers["mid"](torch.zeros(1, 12))  # the engine sets a plan before every forward
    with pytest.raises(TypeError, match="not an nn.Linear"):
        wrap_model(ThreeLinears(), [""], n_slots=3, max_rank=2)


def test_column_major_weights_keep_values_and_outputs(tiny_llama_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (16, 5))
    with torch.no_grad():
        want = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    column_major_weights(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, want, atol=1e-5)

    tied = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "tie_word_embeddings": True}))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    weight = tied.lm_head.weight.detach().clone()
    column_major_weights(tied)  # one tensor for both modules: moved once, not transposed back
    assert torch.equal(tied.model.embed_tokens.weight, weight) and tied.lm_head.weight.t().is_contiguous()


@pytest.fixture(scope="module")
def panel_op():
    op = cpu_kernel.panel_linear()
    assert op is not None, "the CPU kernels did not build: is a C++ compiler (g++) installed?"
    return op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("d_in", "d_out"), [(37, 1), (64, 31), (64, 33), (23, 96), (300, 70), (1100, 300)])
def test_panel_linear_computes_the_linear(panel_op, d_in, d_out, bias, dtype):
    torch.manual_seed(d_in * d_out)
    linear = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    packed = PanelLinear(linear, panel_op)
    # float32 sums; a bfloat16 output is the exact result rounded once (half a unit in its 8th bit)
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (2**-8, 1e-4)
    for rows in (1, 2, 7, 8, 9, 17, 64, 70):  # within, at and across 8- (or 3-) row tiles; few and many rows
        x = torch.randn(rows, d_in).to(dtype)
        want = x.double() @ linear.weight.double().T + (linear.bias.double() if bias else 0)
        got = packed(x)
        assert got.dtype == dtype and got.shape == (rows, d_out)
        assert torch.allclose(got.double(), want, rtol=rtol, atol=atol)
        # each row is summed alike whatever its neighbours: alone it gets the same bits
        assert torch.equal(torch.cat([packed(x[i:i + 1]) for i in range(rows)]), got)
    x = torch.randn(2, 5, d_in).to(dtype)
    assert torch.allclose(packed(x).double(), linear(x).double(), rtol=2 * rtol, atol=atol)


def test_panel_linears_pack_every_float32_linear_but_shared_weights(tiny_llama_path, panel_op):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (4, 6))
    with torch.no_grad():
        want = model(ids).logits
    wrap_model(model, ["model.layers.0.self_attn.q_proj"], n_slots=2, max_rank=2)  # bases of adapted layers too
    n_linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert panel_linears(model, panel_op) == n_linears
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, PanelLinear)
    context = model.model.layers[0].self_attn.q_proj.context
    context.plan = SlotPlan.of([0] * 4, "cpu")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, want, atol=1e-4)

    tied = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "tie_word_embeddings": True}))
    linears = sum(isinstance(m, nn.Linear) for m in tied.modules())
    assert panel_linears(tied, panel_op) == linears - 1
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.model.embed_tokens.weight


def test_panel_linear_op_rejects_what_it_cannot_compute(panel_op):
    packed = PanelLinear(nn.Linear(16, 40), panel_op)
    x, y = torch.randn(3, 16), torch.empty(3, 40)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        panel_op(y.double(), x.double(), packed.panels.double(), packed.bias.double())
    with pytest.raises(RuntimeError, match="the same for"):
        panel_op(y, x.bfloat16(), packed.panels, packed.bias)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        panel_op(torch.empty(3, 70), x, packed.panels, packed.bias)
    with pytest.raises(RuntimeError, match="bias"):
        panel_op(y, x, packed.panels, packed.bias[:40])
    with pytest.raises(RuntimeError, match="contiguous"):
        panel_op(y, torch.randn(16, 3).T, packed.panels, packed.bias)
