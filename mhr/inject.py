"""Put MHR layers into a model (and take them out), and set what they do for a forward or generate call."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mhr.adapter import LoRA
from mhr.config import MHRConfig
from mhr.layer import MHRLinear, Mode, linear_features


class InjectionError(ValueError):
    """The config's targets do not fit the model; the message lists every problem."""


def find_targets(model: nn.Module, config: MHRConfig) -> dict[str, nn.Module]:
    """The linear layers of `model` that the config targets, by full name: nn.Linear, `FrozenLinear` or
    transformers `Conv1D` (`mhr.layer.linear_features`).

    Raises InjectionError when a target matches no linear layer or a matched layer's dims are not
    divisible by the number of heads, listing every such problem.
    """
    linears = {name: features for name, m in model.named_modules() if (features := linear_features(m))}
    targets = {name: features for name, features in linears.items() if config.matches(name)}
    errors = [f"target {t!r} matches no linear layer of {type(model).__name__}"
              for t in config.unmatched_targets(list(linears))]
    h = config.n_heads
    for name, (d_in, d_out) in targets.items():
        if d_in % h or d_out % h:
            errors.append(f"{name}: in_features={d_in}, out_features={d_out} "
                          f"are not both divisible by n_heads={h}")
    if errors:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise InjectionError("cannot adapt this model:\n  " + "\n  ".join(errors)
                             + f"\nits linear layers end in: {', '.join(suffixes) or '(none)'}")
    return {name: model.get_submodule(name) for name in targets}


def inject(model: nn.Module, config: MHRConfig, n_tasks: int) -> dict[str, MHRLinear]:
    """Replace every targeted linear layer of `model` in place by an MHRLinear wrapping it.

    The base weights are frozen and untouched; each layer gets a router with `n_tasks` rows.
    Returns the new layers by module name (the name of the linear they wrap).
    """
    if mhr_layers(model):
        raise InjectionError("model already holds MHR layers: call mhr.remove(model) first")
    layers = {}
    for name, linear in find_targets(model, config).items():
        layers[name] = MHRLinear(linear, config, n_tasks).train(linear.training)  # keep eval mode if set
        model.set_submodule(name, layers[name])
    return layers


def remove(model: nn.Module) -> nn.Module:
    """Put the original linear layers back; returns the model."""
    for name, layer in mhr_layers(model).items():
        model.set_submodule(name, layer.base)
    return model


def mhr_layers(model: nn.Module) -> dict[str, MHRLinear]:
    """The model's MHR layers by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MHRLinear)}


def _layers_or_raise(model: nn.Module) -> dict[str, MHRLinear]:
    layers = mhr_layers(model)
    if not layers:
        raise InjectionError("model holds no MHR layers: call mhr.inject(model, config, n_tasks) first")
    return layers


@contextmanager
def use_tasks(model: nn.Module, task_ids: int | Sequence[int] | Tensor) -> Iterator[None]:
    """Route every MHR layer of `model` by `task_ids` (one per example, or one for all) inside the block.

        with mhr.use_tasks(model, [0, 3]):
            model.generate(input_ids, num_beams=4)   # rows are repeated per beam: ids follow
    """
    ids = torch.as_tensor(task_ids, dtype=torch.long)
    layers = _layers_or_raise(model)
    previous = {name: layer.task_ids for name, layer in layers.items()}
    for layer in layers.values():
        layer.task_ids = ids
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.task_ids = previous[name]


def set_mode(model: nn.Module, mode: Mode) -> None:
    """Switch every MHR layer to `mode`."""
    layers = _layers_or_raise(model)
    if mode is Mode.DENSE and any(layer.dense_A is None for layer in layers.values()):
        raise RuntimeError("Mode.DENSE needs a dense LoRA in every layer: use load_lora or start_average")
    for layer in layers.values():
        layer.mode = mode


def load_lora(model: nn.Module, lora: LoRA) -> None:
    """Give every MHR layer the matching module of `lora` as its dense LoRA (Mode.DENSE)."""
    layers = _layers_or_raise(model)
    if set(lora.modules) != set(layers):
        raise InjectionError(
            f"LoRA modules do not match the model's MHR layers: missing {sorted(set(layers) - set(lora.modules))}, "
            f"unexpected {sorted(set(lora.modules) - set(layers))}"
        )
    for name, layer in layers.items():
        layer.load_dense(lora.A[name], lora.B[name], lora.scaling)


def start_average(model: nn.Module) -> None:
    """Give every layer a dense LoRA initialised to the MHR-mu average of its skills (Mode.DENSE)."""
    for layer in _layers_or_raise(model).values():
        layer.load_average()


def dense_lora(model: nn.Module) -> LoRA:
    """The dense LoRAs the layers hold, as one LoRA (alpha chosen so that alpha / rank = scaling)."""
    layers = _layers_or_raise(model)
    parts = {name: layer.dense_lora() for name, layer in layers.items()}
    scalings = {s for _, _, s in parts.values()}
    if len(scalings) != 1:
        raise RuntimeError(f"dense LoRAs with different scalings {sorted(scalings)} cannot form one LoRA")
    A = {n: a.clone() for n, (a, _, _) in parts.items()}
    B = {n: b.clone() for n, (_, b, _) in parts.items()}
    rank = next(iter(A.values())).shape[-1]
    return LoRA(A, B, alpha=scalings.pop() * rank)
