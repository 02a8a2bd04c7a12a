"""The model side of a run: loading the backbone, seeding, choosing what trains, filling in an inventory.

Leaves the adapter layers themselves to `mhr` and the optimization to `training.loop`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import mhr


def seed_everything(seed: int) -> None:
    """Seed every RNG a run draws from (adapter init, relaxed-Bernoulli routing, dropout)."""
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (one device holds them all)."""
    return next(model.parameters()).device


def load_backbone(name_or_path: str, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
    """A causal or encoder-decoder (T5-style) LM on `device`, eval mode and frozen, and its tokenizer, from
    a local directory or hub id. Inject MHR layers after loading: they are created on their base layer's device.

    Raises OSError naming the backbone when it cannot be loaded (transformers raises several kinds).
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load the backbone {name_or_path!r}: {e}") from e
    return model.requires_grad_(False), tokenizer


def set_trainable(model: nn.Module, *, skills: bool = False, routing: bool = False, dense: bool = False) -> None:
    """Freeze everything, then unfreeze the chosen adapter parts of every MHR layer."""
    model.requires_grad_(False)
    for layer in mhr.mhr_layers(model).values():
        layer.lora_A.requires_grad_(skills)
        layer.lora_B.requires_grad_(skills)
        layer.router.logits.requires_grad_(routing)
        if layer.dense_A is not None:
            layer.dense_A.requires_grad_(dense)
            layer.dense_B.requires_grad_(dense)


def load_inventory(model: nn.Module, bundle: mhr.Bundle) -> None:
    """Copy the bundle's skills into the model's MHR layers (injected with the bundle's config)."""
    layers = mhr.mhr_layers(model)
    if set(layers) != set(bundle.modules):
        raise mhr.BundleError(f"the bundle's modules do not match the model's MHR layers: "
                              f"missing {sorted(set(bundle.modules) - set(layers))[:4]}, "
                              f"unexpected {sorted(set(layers) - set(bundle.modules))[:4]}")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(bundle.lora_A[name])
            layer.lora_B.copy_(bundle.lora_B[name])


def add_inventory(model: nn.Module, bundle: mhr.Bundle, n_tasks: int) -> None:
    """Inject the bundle's MHR layers into `model` (its backbone) with `n_tasks` fresh routing rows, and
    load the bundle's skills into them."""
    mhr.inject(model, bundle.config, n_tasks)
    load_inventory(model, bundle)


def model_for_bundle(bundle: mhr.Bundle, n_tasks: int, backbone: str | None = None,
                     device: torch.device | str = "cpu") -> tuple[nn.Module, object]:
    """The bundle's backbone (or `backbone`, e.g. the same model moved elsewhere; checked against the bundle's
    fingerprint) on `device` with the bundle's inventory and `n_tasks` fresh routing rows."""
    model, tokenizer = load_backbone(backbone or bundle.backbone, device=device)
    bundle.check_backbone(model)
    add_inventory(model, bundle, n_tasks)
    return model, tokenizer
