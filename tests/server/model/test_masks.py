"""The transformers forward's masks: the cache's causal mask narrowed to each sliding layer's window, checked
against transformers' own mask function; one mask, or one per layer kind where a model mixes them."""

from types import SimpleNamespace

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from server.engine.kv_cache import RowKVCache
from server.model.masks import FULL, SLIDING, UnsupportedAttention, model_mask

WINDOW = 3


def reference(mask_function, positions, n_keys):
    """transformers' mask function evaluated at every (query position, key position): [1, 1, L, K]."""
    index = torch.tensor  # transformers' mask functions take index tensors
    return torch.tensor([[[[bool(mask_function(index(0), index(0), index(q), index(k))) for k in range(n_keys)]
                           for q in positions]]])


def cache_parts():
    """A prompt of 7 tokens prefilled, then a decode step, on one row of a cache: (mask, positions) of each."""
    kv = RowKVCache(1, 2, 1, 16, 4, "cpu", torch.float32)
    prefill = kv.begin_prefill(kv.add_rows(1), [7])
    return [prefill, kv.begin_decode()]


@pytest.mark.parametrize("part", [0, 1], ids=["prefill", "decode"])
def test_sliding_layers_see_the_window_as_transformers_defines_it(part):
    attention = cache_parts()[part]
    positions = attention.positions[0].tolist()
    n_keys = attention.mask.shape[-1]
    mistral = MistralConfig(sliding_window=WINDOW)  # every layer slides
    assert torch.equal(model_mask(mistral, attention.mask, attention.positions),
                       reference(sliding_window_causal_mask_function(WINDOW), positions, n_keys))
    gemma2 = Gemma2Config(sliding_window=WINDOW, num_hidden_layers=2, layer_types=[SLIDING, FULL])
    masks = model_mask(gemma2, attention.mask, attention.positions)
    assert torch.equal(masks[FULL], reference(causal_mask_function, positions, n_keys))
    assert torch.equal(masks[SLIDING], reference(sliding_window_causal_mask_function(WINDOW), positions, n_keys))


def test_models_without_sliding_layers_get_the_cache_mask_itself():
    attention = cache_parts()[0]
    for config in (LlamaConfig(), Qwen2Config(sliding_window=WINDOW, use_sliding_window=False)):
        assert model_mask(config, attention.mask, attention.positions) is attention.mask


def test_other_attention_kinds_are_refused_by_name():
    config = SimpleNamespace(layer_types=[FULL, "linear_attention"])
    attention = cache_parts()[0]
    with pytest.raises(UnsupportedAttention, match="'linear_attention'"):
        model_mask(config, attention.mask, attention.positions)
