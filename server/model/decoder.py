"""A lean decoder forward for the Llama family, over the engine's own KV cache.

Owns computing a step's logits (the running rows' next tokens, new prompts, a prompt's chunk: one
forward for all) for models whose architecture is exactly Llama's
(`LlamaForCausalLM`, and `MistralForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM` without sliding
windows: Qwen2's q/k/v bias lives in its linears, which are called as they are; Qwen3's per-head query and
key norms are the model's own modules) without transformers' per-layer
machinery (mask preparation, attention-interface dispatch, keyword plumbing, output dataclasses). On a
small backbone that machinery costs as much as the matmuls at decode (docs/engine.md). It calls
the model's own modules and weights: its embedding, RMSNorms, rotary embedding (so every rope type the
model supports is applied as the model applies it), MLP, lm_head, and the `BatchedLoRALinear`
projections. `lean_decoder_for` picks it, or None: the engine then runs the transformers forward.
The KV cache (`server.engine.kv_cache`) and the slot plan (`server.model.layers.SlotContext`) are set by the engine.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from server.engine.kv_cache import Attention, RowKVCache
from server.model.lora_ops import SlotPlan

# Exact classes, not subclasses: a subclass may change the forward this module re-implements. Qwen3 differs
# from Llama only by an RMSNorm over each head of the queries and keys (`q_norm`, `k_norm`) before rotary.
LLAMA_FAMILY = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)


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


class Part(NamedTuple):
    """One group of rows in a step's forward: running rows' next tokens, new prompts (right-padded to one
    length), or a prompt's chunk. ids [n, L]; `attention` from the KV cache's `begin_*`; `plan` the rows'
    slots; keep: the positions whose logits are wanted (an index tensor), or an int: the last `keep`."""

    ids: Tensor
    attention: Attention
    plan: SlotPlan
    keep: int | Tensor


class LeanDecoder:
    """Logits of `model` (one of `LLAMA_FAMILY`) for the parts of a step, all in one forward.

    The parts' tokens are packed into one [tokens, d] input, so every linear (and its adapters) runs once
    a step over all of them, reading its weights once; attention runs part by part, each over its own rows
    of the KV cache. The model's `SlotContext` holds the packed plan (`SlotPlan.packed`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model, self.body = model, model.model
        attn = self.body.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.gqa = model.config.num_attention_heads != model.config.num_key_value_heads
        self.head_norms = hasattr(attn, "q_norm")  # Qwen3

    def __call__(self, parts: list[Part], kv: RowKVCache) -> list[Tensor]:
        """Each part's logits [n, keep, V]."""
        h = self.body.embed_tokens(_cat([p.ids.reshape(-1) for p in parts]))      # [T, d]
        half = self.head_dim // 2
        rope = []
        for p in parts:
            cos, sin = self.body.rotary_emb(h, p.attention.positions)              # [n, L, D] each
            # rotate_half(x) * sin == roll(x, D/2) * [-sin_1, sin_2], bit for bit (negation is exact)
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            rope.append((cos[:, None], sin[:, None]))                              # [n, 1, L, D]
        for i, layer in enumerate(self.body.layers):
            h = h + self._attention(layer.self_attn, layer.input_layernorm(h), parts, rope, kv, i)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        kept = []                                                                  # norm only what is kept
        for p, hp in zip(parts, _split(h, parts), strict=True):
            kept.append(hp[:, -p.keep:] if isinstance(p.keep, int) else hp[:, p.keep])
        logits = self.model.lm_head(self.body.norm(_cat([k.reshape(-1, k.shape[-1]) for k in kept])))
        sizes = [k.shape[0] * k.shape[1] for k in kept]
        return [part.view(*k.shape[:2], -1) for part, k in zip(logits.split(sizes), kept, strict=True)]

    def decode(self, ids: Tensor, positions: Tensor, write: Tensor, mask: Tensor, plan: SlotPlan,
               kv: RowKVCache) -> Tensor:
        """Logits [N, V] of one new token for each of N rows: the forward of a single decode part, with its
        `Attention` given as tensors only (what `server.model.compiled` compiles: the attended length is
        `mask`'s last dim, not a Python int). ids, positions [N]; write [N * kv_heads], mask [N, 1, 1, K]
        as `RowKVCache.begin_decode` makes them."""
        attention = Attention(mask, positions[:, None], ("decode", write, ids.shape[0], mask.shape[-1]))
        return self([Part(ids[:, None], attention, plan, 1)], kv)[0][:, 0]

    def _attention(self, attn: nn.Module, x: Tensor, parts: list[Part], rope: list[tuple[Tensor, Tensor]],
                   kv: RowKVCache, layer: int) -> Tensor:
        D = self.head_dim
        q_all, k_all, v_all = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)     # [T, *]
        outs = []
        for p, (cos, sin), q, k, v in zip(parts, rope, _split(q_all, parts), _split(k_all, parts),
                                          _split(v_all, parts), strict=True):
            n, L = p.ids.shape
            q, k, v = (t.view(n, L, -1, D) for t in (q, k, v))
            if self.head_norms:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))                        # [n, heads, L, D]
            q = q * cos + q.roll(D // 2, -1) * sin
            k = k * cos + k.roll(D // 2, -1) * sin
            q, k, v = q.to(kv.dtype), k.to(kv.dtype), v.to(kv.dtype)                # attention in the cache's dtype
            keys, values = kv.store(p.attention.write, k, v, layer)                 # [n, KVH, K, D]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=p.attention.mask, scale=self.scaling,
                                                 enable_gqa=self.gqa)               # [n, H, L, D]
            outs.append(out.transpose(1, 2).reshape(n * L, -1).to(x.dtype))
        return attn.o_proj(_cat(outs))


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _split(packed: Tensor, parts: list[Part]) -> list[Tensor]:
    """`packed` [T, ...] back into each part's rows [n, L, ...]."""
    out, start = [], 0
    for p in parts:
        n, L = p.ids.shape
        out.append(packed[start:start + n * L].view(n, L, *packed.shape[1:]))
        start += n * L
    return out
