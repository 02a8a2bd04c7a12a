"""The attention mask the engine hands the transformers forward: the KV cache's causal mask, narrowed to
the sliding window on the layers that attend through one.

A 4-D mask reaches a transformers model's attention as it is (the model builds none of its own), so a
model whose layers attend through a sliding window (Mistral, Gemma 2 and 3, Qwen2 with `use_sliding_window`)
must get the window in it. A model with one kind of layer takes a single mask; a model mixing kinds takes
one per kind, keyed by `config.layer_types`' names (what such models' forwards accept). Which kind each
layer is, and the window's width, are the model config's: this module only reads them.
"""

from __future__ import annotations

import torch
from torch import Tensor

FULL, SLIDING = "full_attention", "sliding_attention"


class UnsupportedAttention(ValueError):
    """The model has layers of an attention kind the engine does not mask (chunked, linear, ...)."""


def layer_kinds(config) -> set[str]:
    """The attention kinds of the model's layers: FULL and/or SLIDING.

    Raises UnsupportedAttention naming any other kind `config.layer_types` lists.
    """
    window = getattr(config, "sliding_window", None)
    sliding = window is not None and getattr(config, "use_sliding_window", True) is not False
    kinds = set(getattr(config, "layer_types", None) or [SLIDING if sliding else FULL])
    if kinds - {FULL, SLIDING}:
        raise UnsupportedAttention(f"{type(config).__name__} has layers of attention kind(s) "
                                   f"{sorted(kinds - {FULL, SLIDING})}: the engine serves {FULL} and {SLIDING} only")
    return kinds


def model_mask(config, mask: Tensor, positions: Tensor) -> Tensor | dict[str, Tensor]:
    """The `attention_mask` argument for a transformers forward of the model of `config`.

    mask [n, 1, L, K] bool: the cache's causal mask over cache positions 0..K-1; positions [n, L]: the
    queries' positions. A query at position p sees keys at positions p - window + 1 .. p on sliding layers.
    """
    kinds = layer_kinds(config)
    if SLIDING not in kinds:
        return mask
    keys = torch.arange(mask.shape[-1], device=mask.device)                           # [K]
    sliding = mask & (keys > positions[:, None, :, None] - config.sliding_window)     # [n, 1, L, K]
    return sliding if kinds == {SLIDING} else {FULL: mask, SLIDING: sliding}
