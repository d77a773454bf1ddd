"""Ragged attention for dynamic batching: per-request key/value buffers, attention computed request by request.

Why not one left-padded `DynamicCache` for the running batch: padding changes the length of the reductions inside
attention (the softmax sum, probabilities @ values), so a request's logits would differ in their last bits between
running alone and running next to a longer request, and a greedy token can flip. Here the projections, norms and MLPs
run batched, while each request's attention reads only its own buffer, with exactly the shapes and strides it has
when it runs alone. Joining and leaving the batch is a list operation: no cache is merged, padded or compacted.

`use_ragged_attention(model)` registers the function with transformers' `AttentionInterface` and switches one model
instance to it; the engine then passes the buffers of each forward's rows as `functok_rows`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from functok_vllm.offline import go_offline

ATTN_NAME = "functok_ragged"


class KVBuffer:
    """One request's keys and values at every layer, preallocated to the request's longest possible length."""

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        self.k = torch.empty(layers, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(layers, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.length = 0  # positions written by completed forwards; the engine advances it after each forward


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, functok_rows=(), **_):
    """Row b's new keys/values go into functok_rows[b] (None: a filler row, output zeros); it attends to its own.

    query (batch, heads, new, head_dim); key, value (batch, kv_heads, new, head_dim) after RoPE. A row with more than
    one new token is a prefill from an empty buffer (causal); otherwise it is one decode token (attends to all).
    """
    layer = module.layer_idx
    batch, heads, new, head_dim = query.shape
    out = query.new_zeros(batch, new, heads, head_dim)  # (batch, new, heads, head_dim), what o_proj expects
    gqa = key.shape[1] != heads
    for b, kv in enumerate(functok_rows):
        if kv is None:
            continue
        end = kv.length + new
        kv.k[layer, :, kv.length : end] = key[b]
        kv.v[layer, :, kv.length : end] = value[b]
        o = F.scaled_dot_product_attention(
            query[b : b + 1],
            kv.k[layer, None, :, :end],  # (1, kv_heads, end, head_dim)
            kv.v[layer, None, :, :end],
            is_causal=new > 1,
            scale=scaling,
            enable_gqa=gqa,
        )
        out[b] = o[0].transpose(0, 1)
    return out, None


def use_ragged_attention(model) -> None:
    """Switch this model instance (not others) to ragged attention; its forwards then need `functok_rows`."""
    go_offline()
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, ragged_attention)
    model.set_attn_implementation(ATTN_NAME)
