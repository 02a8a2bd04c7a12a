"""A lean decoder forward for the Llama family, over the engine's own KV cache.

Owns computing a prefill or decode step's logits for models whose architecture is exactly Llama's
(`LlamaForCausalLM`, and `MistralForCausalLM` / `Qwen2ForCausalLM` without sliding windows: Qwen2's
q/k/v bias lives in its linears, which are called as they are) without transformers' per-layer
machinery (mask preparation, attention-interface dispatch, keyword plumbing, output dataclasses). On a
small backbone that machinery costs as much as the matmuls at decode (DESIGN.md section 5). It calls
the model's own modules and weights: its embedding, RMSNorms, rotary embedding (so every rope type the
model supports is applied as the model applies it), MLP, lm_head, and the `BatchedLoRALinear`
projections. `lean_decoder_for` picks it, or None: the engine then runs the transformers forward.
The KV cache (`server.kv_cache`) and the slot plan (`server.model.SlotContext`) are set by the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from server.kv_cache import RowKVCache

# Exact classes, not subclasses: a subclass may change the forward this module re-implements.
LLAMA_FAMILY = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)


def lean_decoder_for(model: nn.Module, max_seq_len: int) -> LeanDecoder | None:
    """The lean forward when it computes exactly what `model`'s own forward does, else None."""
    if type(model) not in LLAMA_FAMILY:
        return None
    c = model.config
    if any(t != "full_attention" for t in (getattr(c, "layer_types", None) or [])):
        return None
    window = getattr(c, "sliding_window", None)
    if window is not None and getattr(c, "use_sliding_window", True) and window < max_seq_len:
        return None
    return LeanDecoder(model)


class LeanDecoder:
    """Logits of `model` (one of `LLAMA_FAMILY`) for the step the KV cache was set up for."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.body = model, model.model
        attn = self.body.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.gqa = model.config.num_attention_heads != model.config.num_key_value_heads

    def __call__(self, ids: Tensor, positions: Tensor, mask: Tensor, kv: RowKVCache,
                 keep: int | Tensor) -> Tensor:
        """ids [n, L], positions [n, L], mask [n, 1, L, K] bool (from the KV cache) -> logits [n, keep, V].

        keep: the positions whose logits are wanted (an index tensor), or an int: the last `keep`.
        """
        h = self.body.embed_tokens(ids)                                             # [n, L, d]
        cos, sin = self.body.rotary_emb(h, positions)                               # [n, L, D] each
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_1, sin_2], bit for bit (negation is exact)
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]       # [n, 1, L, D]
        cos = cos[:, None]
        for i, layer in enumerate(self.body.layers):
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), cos, sin, mask, kv, i)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = h[:, -keep:] if isinstance(keep, int) else h[:, keep]                   # norm only what is kept
        return self.model.lm_head(self.body.norm(h))

    def _attention(self, attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv: RowKVCache,
                   layer: int) -> Tensor:
        n, L, _ = x.shape
        D = self.head_dim
        q = attn.q_proj(x).view(n, L, -1, D).transpose(1, 2)                        # [n, H, L, D]
        k = attn.k_proj(x).view(n, L, -1, D).transpose(1, 2)                        # [n, KVH, L, D]
        v = attn.v_proj(x).view(n, L, -1, D).transpose(1, 2)
        q = q * cos + q.roll(D // 2, -1) * sin
        k = k * cos + k.roll(D // 2, -1) * sin
        q, k, v = q.to(kv.dtype), k.to(kv.dtype), v.to(kv.dtype)                    # attention in the cache's dtype
        keys, values = kv.update(k, v, layer)                                       # [n, KVH, K, D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                             enable_gqa=self.gqa)                   # [n, H, L, D]
        return attn.o_proj(out.transpose(1, 2).reshape(n, L, -1).to(x.dtype))
