"""Injection into the tiny Llama: targets, errors, task routing through forward and generate, removal."""

import pytest
import torch
from torch import nn

import mhr
from mhr import InjectionError, MHRConfig, MHRLinear, Mode
from tests.mhr import reference

QV = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
      "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
N_TASKS = 4


def inject(model, seed=0, **config):
    config = dict(n_skills=3, n_heads=2, rank=2, alpha=2.0, target_modules=["q_proj", "v_proj"]) | config
    layers = mhr.inject(model, MHRConfig(**config), N_TASKS)
    g = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        reference.randomize(layer, g)
    return layers


def input_ids(batch=2, length=5, seed=0):
    return torch.randint(4, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["q_proj", "v_proj"], QV),
        (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", QV),
        (r".*layers\.1\..*_proj", ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                                    "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
                                    "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                    "model.layers.1.mlp.down_proj"]),
        (["layers.0.mlp.down_proj", "lm_head"], ["model.layers.0.mlp.down_proj", "lm_head"]),
    ],
)
def test_targets_by_name_and_regex(tiny_llama, targets, expected):
    originals = {name: tiny_llama.get_submodule(name) for name in expected}
    layers = mhr.inject(tiny_llama, MHRConfig(n_heads=2, target_modules=targets), N_TASKS)
    assert sorted(layers) == sorted(expected)
    assert sorted(mhr.mhr_layers(tiny_llama)) == sorted(expected)
    for name in expected:
        layer = tiny_llama.get_submodule(name)
        assert isinstance(layer, MHRLinear) and layer is layers[name]
        assert layer.base is originals[name]
        assert layer.router.n_tasks == N_TASKS


@pytest.mark.parametrize("targets, missing", [(["q_proj", "qkv_proj"], "qkv_proj"),
                                              (r".*\.c_attn", r".*\.c_attn")])
def test_target_matching_nothing_is_named(tiny_llama, targets, missing):
    with pytest.raises(InjectionError) as info:
        mhr.inject(tiny_llama, MHRConfig(n_heads=2, target_modules=targets), N_TASKS)
    assert repr(missing) in str(info.value)
    assert "q_proj" in str(info.value)  # it lists the names the model does have
    assert mhr.mhr_layers(tiny_llama) == {}  # nothing was half-injected


def test_heads_not_dividing_a_dim_name_the_module(tiny_llama):
    with pytest.raises(InjectionError) as info:
        mhr.inject(tiny_llama, MHRConfig(n_heads=3, target_modules=["q_proj"]), N_TASKS)
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in message and "model.layers.1.self_attn.q_proj" in message
    assert "n_heads=3" in message
    assert mhr.mhr_layers(tiny_llama) == {}


def test_only_the_undivisible_modules_are_reported():
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 6), nn.Linear(6, 8))
    with pytest.raises(InjectionError) as info:
        mhr.inject(model, MHRConfig(n_heads=4, target_modules=r"\d"), 2)
    problems = [line.strip() for line in str(info.value).splitlines() if "divisible" in line]
    assert [p.split(":")[0] for p in problems] == ["1", "2"]  # 8 -> 12 divides by 4; the others do not


def test_injecting_twice_raises(tiny_llama):
    inject(tiny_llama)
    with pytest.raises(InjectionError, match="already"):
        inject(tiny_llama)


def test_fresh_layers_leave_logits_exactly_unchanged(tiny_llama):
    ids = input_ids()
    before = logits(tiny_llama, ids)
    mhr.inject(tiny_llama, MHRConfig(n_heads=2, target_modules=r".*_proj"), N_TASKS)  # B = 0
    with mhr.use_tasks(tiny_llama, [0, 3]):
        assert torch.equal(logits(tiny_llama, ids), before)


def test_routed_model_without_task_ids_raises(tiny_llama):
    inject(tiny_llama)
    with pytest.raises(RuntimeError, match="use_tasks"):
        logits(tiny_llama, input_ids())


def test_use_tasks_routes_each_example_and_restores(tiny_llama):
    layers = inject(tiny_llama)
    ids = input_ids(batch=3)
    with mhr.use_tasks(tiny_llama, [2, 0, 2]):
        batched = logits(tiny_llama, ids)
    assert all(layer.task_ids is None for layer in layers.values())
    for i, task in enumerate([2, 0, 2]):
        with mhr.use_tasks(tiny_llama, task):
            torch.testing.assert_close(batched[i], logits(tiny_llama, ids[i:i + 1])[0], rtol=1e-5, atol=1e-5)
    # the routing changes the output: tasks differ from each other and from the base model
    with mhr.use_tasks(tiny_llama, 1):
        other = logits(tiny_llama, ids)
    assert (batched - other).abs().max() > 1e-3
    with mhr.use_tasks(tiny_llama, torch.tensor([2, 0, 2])):  # tensors work as well as lists
        assert torch.equal(logits(tiny_llama, ids), batched)


def test_use_tasks_nests(tiny_llama):
    layers = inject(tiny_llama)
    with mhr.use_tasks(tiny_llama, 1):
        with mhr.use_tasks(tiny_llama, [2, 3]):
            assert all(layer.task_ids.tolist() == [2, 3] for layer in layers.values())
        assert all(layer.task_ids.tolist() == 1 for layer in layers.values())
    assert all(layer.task_ids is None for layer in layers.values())


def test_helpers_need_mhr_layers(tiny_llama):
    for call in (lambda: mhr.use_tasks(tiny_llama, 0).__enter__(),
                 lambda: mhr.set_mode(tiny_llama, Mode.AVERAGE),
                 lambda: mhr.start_average(tiny_llama)):
        with pytest.raises(InjectionError, match="inject"):
            call()


def _generate(model, ids, tasks, **kwargs):
    with mhr.use_tasks(model, tasks):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                              do_sample=False, return_dict_in_generate=True, output_scores=True, **kwargs)


def test_generate_greedy_routes_each_row(tiny_llama):
    inject(tiny_llama)
    prompt = input_ids(batch=1)
    ids = prompt.repeat(2, 1)  # one prompt under two tasks
    out = _generate(tiny_llama, ids, [0, 3])
    assert out.sequences.shape == (2, prompt.shape[1] + 4)
    for i, task in enumerate([0, 3]):
        alone = _generate(tiny_llama, prompt, task)
        assert torch.equal(out.sequences[i], alone.sequences[0])
        for step, step_alone in zip(out.scores, alone.scores, strict=True):
            torch.testing.assert_close(step[i], step_alone[0], rtol=1e-4, atol=1e-4)
    assert (out.scores[0][0] - out.scores[0][1]).abs().max() > 1e-3  # the two tasks really differ


def test_generate_beam_search_repeats_ids_per_beam(tiny_llama):
    inject(tiny_llama)
    prompt = input_ids(batch=1, seed=3)
    ids = prompt.repeat(2, 1)
    out = _generate(tiny_llama, ids, [1, 2], num_beams=2, num_return_sequences=2)
    assert out.sequences.shape[0] == 4
    for i, task in enumerate([1, 2]):
        alone = _generate(tiny_llama, prompt, task, num_beams=2, num_return_sequences=2)
        assert torch.equal(out.sequences[2 * i:2 * i + 2], alone.sequences)
        torch.testing.assert_close(out.sequences_scores[2 * i:2 * i + 2], alone.sequences_scores,
                                   rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.sequences_scores[:2], out.sequences_scores[2:])


def test_base_weights_never_change_and_remove_restores(tiny_llama):
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    originals = {name: tiny_llama.get_submodule(name) for name in QV}
    layers = inject(tiny_llama, relaxed_routing=True)
    for layer in layers.values():
        assert not layer.base.weight.requires_grad
    tiny_llama.train()
    with mhr.use_tasks(tiny_llama, [0, 1]):
        out = tiny_llama(input_ids=input_ids(), labels=input_ids())
    out.loss.backward()
    with torch.no_grad():  # a training step on every trainable parameter
        for p in tiny_llama.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert all(layer.base.weight.grad is None for layer in layers.values())
    assert all(layer.lora_A.grad is not None for layer in layers.values())

    assert mhr.remove(tiny_llama) is tiny_llama
    assert mhr.mhr_layers(tiny_llama) == {}
    for name, linear in originals.items():
        assert tiny_llama.get_submodule(name) is linear
    # The wrapped layers are untouched. (inject freezes only the layers it wraps: embeddings and
    # norms kept requires_grad and were stepped above, which is why not the whole state is compared.)
    for name in QV:
        assert torch.equal(tiny_llama.state_dict()[name + ".weight"], state[name + ".weight"])
    assert tiny_llama.state_dict().keys() == state.keys()


def test_inject_forward_remove_leaves_state_identical(tiny_llama):
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    ids = input_ids()
    before = logits(tiny_llama, ids)
    inject(tiny_llama, target_modules=r".*_proj")
    with mhr.use_tasks(tiny_llama, [1, 2]):
        assert not torch.allclose(logits(tiny_llama, ids), before)
    mhr.remove(tiny_llama)
    after = tiny_llama.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(logits(tiny_llama, ids), before)
    inject(tiny_llama)  # and the model can be adapted again


def test_set_mode_and_start_average(tiny_llama):
    layers = inject(tiny_llama)
    ids = input_ids()
    with pytest.raises(RuntimeError, match="dense"):
        mhr.set_mode(tiny_llama, Mode.DENSE)
    mhr.set_mode(tiny_llama, Mode.AVERAGE)
    averaged = logits(tiny_llama, ids)  # no task ids needed
    # the reference: every layer with the uniform 1/K mixture as a dense LoRA computed here
    mhr.set_mode(tiny_llama, Mode.ROUTED)
    for layer in layers.values():
        K, h = layer.lora_A.shape[:2]
        A, B = reference.task_lora(layer.lora_A, layer.lora_B, torch.full((h, K), 1.0 / K))
        layer.load_dense(A.float(), B.float(), layer.scaling)
    torch.testing.assert_close(logits(tiny_llama, ids), averaged, rtol=1e-5, atol=1e-5)

    mhr.start_average(tiny_llama)
    assert all(layer.mode is Mode.DENSE for layer in layers.values())
    torch.testing.assert_close(logits(tiny_llama, ids), averaged, rtol=1e-5, atol=1e-5)
    mhr.set_mode(tiny_llama, Mode.ROUTED)
    with pytest.raises(RuntimeError, match="use_tasks"):
        logits(tiny_llama, ids)


def test_load_lora_and_dense_lora(tiny_llama):
    ids = input_ids()
    base = logits(tiny_llama, ids)
    layers = inject(tiny_llama)
    g = torch.Generator().manual_seed(9)
    A = {n: torch.randn(64, 3, generator=g) * 0.1 for n in layers}
    B = {n: torch.randn(3, 64, generator=g) * 0.1 for n in layers}
    lora = mhr.LoRA(A, B, alpha=6.0)  # scaling 2
    mhr.load_lora(tiny_llama, lora)
    assert all(layer.mode is Mode.DENSE for layer in layers.values())
    got = logits(tiny_llama, ids)  # no task ids needed
    back = mhr.dense_lora(tiny_llama)
    assert back.scaling == lora.scaling and back.equal(lora)
    # reference: fold each LoRA into its base weight, with the MHR layers removed
    mhr.remove(tiny_llama)
    with torch.no_grad():
        for n in layers:
            tiny_llama.get_submodule(n).weight += 2.0 * (A[n] @ B[n]).T
    torch.testing.assert_close(got, logits(tiny_llama, ids), rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3


def test_load_lora_rejects_other_modules(tiny_llama):
    layers = inject(tiny_llama)
    names = list(layers)[:-1] + ["model.layers.0.mlp.up_proj"]
    lora = mhr.LoRA({n: torch.zeros(64, 2) for n in names}, {n: torch.zeros(2, 64) for n in names}, 1.0)
    with pytest.raises(InjectionError) as info:
        mhr.load_lora(tiny_llama, lora)
    assert "model.layers.0.mlp.up_proj" in str(info.value) and QV[-1] in str(info.value)


def test_works_on_any_module_tree():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    layers = mhr.inject(model, MHRConfig(n_heads=4, target_modules=["0", "2.0"]), 2)
    assert sorted(layers) == ["0", "2.0"]
    with mhr.use_tasks(model, [0, 1]), torch.no_grad():
        assert model(torch.randn(2, 8)).shape == (2, 4)


@pytest.mark.parametrize("training", [False, True])
def test_injected_layers_keep_the_train_or_eval_mode(tiny_llama, training):
    # An eval model must stay deterministic after inject: new layers follow the layer they replace.
    tiny_llama.train(training)
    layers = inject(tiny_llama)
    assert all(layer.training is training for layer in layers.values())
    ids = input_ids()
    with mhr.use_tasks(tiny_llama, [0, 1]):
        assert torch.equal(logits(tiny_llama, ids), logits(tiny_llama, ids)) is not training


def test_a_conv1d_is_adapted_as_the_linear_over_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layer: y = x @ W + b, W [in, out]

    conv = Conv1D(12, 8)  # nf (out), nx (in)
    torch.nn.init.normal_(conv.bias)
    linear = nn.Linear(8, 12)
    linear.weight.data, linear.bias.data = conv.weight.data.t().clone(), conv.bias.data.clone()
    models = [nn.Sequential(conv).eval(), nn.Sequential(linear).eval()]
    layers = [inject(m, target_modules=["0"])["0"] for m in models]  # the same B and logits
    with torch.no_grad():
        layers[1].lora_A.copy_(layers[0].lora_A)
    assert (layers[0].in_features, layers[0].out_features) == (8, 12)
    x = torch.randn(3, 8)
    with mhr.use_tasks(models[0], [0, 1, 2]), mhr.use_tasks(models[1], [0, 1, 2]), torch.no_grad():
        assert torch.allclose(models[0](x), models[1](x), atol=1e-6)
    mhr.remove(models[0])
    assert models[0][0] is conv


def test_a_layer_that_is_not_linear_is_refused():
    with pytest.raises(TypeError, match="a Conv2d is not a linear layer"):
        MHRLinear(nn.Conv2d(4, 4, 1), MHRConfig(n_heads=2), N_TASKS)
