"""Per-request (ragged) attention for dynamic batching, computed by the model's own attention and mask functions.

Why not one left-padded `DynamicCache` for the running batch: padding changes the length of the reductions inside
attention (the softmax sum, probabilities @ values), so a request's logits would differ in their last bits between
running alone and running next to a longer request, and a greedy token can flip. Here the projections, norms and MLPs
run batched, while each request's attention reads only its own buffer, with exactly the shapes and strides it has
when it runs alone. Joining and leaving the batch is a list operation: no cache is merged, padded or compacted.

Nothing of a family's attention is re-implemented. The model is switched to the name `functok_ragged` in both of
transformers' interfaces (attention functions and mask builders):
- the model still asks `masking_utils` for its masks (causal, sliding window, chunked, bidirectional...); the mask
  builder registered here only records what was asked (`MaskRule`), and each request's mask is then built from that
  record by the original implementation's own mask builder, for the request's own past length;
- each request's attention is the function the model would have called (the original implementation from the
  attention interface the layer's own code uses, or the family's own `eager_attention_forward`), given every keyword
  the layer passed: scaling, dropout, sliding_window, softcap, s_aux...

`RaggedAttention(model)` switches one model instance, and checks at start-up that this holds for it: every decoder
layer attends exactly once per forward through it, and a short probe (a prefill, then decode steps) gives the logits
of the model's plain forward. A model that fails is refused with `UnsupportedModel`, naming its class.
"""

from __future__ import annotations

import inspect
import logging

import torch

from functok_vllm.engines.placement import decoder_layers
from functok_vllm.offline import go_offline

log = logging.getLogger("functok.engine")
ATTN_NAME = "functok_ragged"
# Keywords that change the attention scores inside the attention function: an implementation whose signature does
# not name one ignores it (transformers' sdpa drops Gemma-2's softcap), so the family's eager function is used instead.
SCORE_KWARGS = ("softcap", "s_aux")
PROBE_PREFILL, PROBE_DECODE = 6, 3  # probe tokens at start-up: one prefill, then decode steps one token each
PROBE_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}  # max logit difference / max |logit|; 0.1 for 16-bit types


class UnsupportedModel(ValueError):
    """The model cannot be served exactly with ragged attention (raised at start-up; the message names its class)."""


class KVBuffer:
    """One request's keys and values, per layer, preallocated to the request's longest possible length.

    A layer's buffers are allocated on its first write, shaped like the keys and values that layer produces, so no
    config key (num_key_value_heads, head_dim) is assumed and layers may differ.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.k: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, capacity, head_dim)
        self.v: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, capacity, v_head_dim)
        self.length = 0  # positions written by completed forwards; the engine advances it after each forward

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (kv_heads, new, dim) keys and values after `length`; return (1, kv_heads, length + new, dim) views."""
        if layer not in self.k:
            self.k[layer] = key.new_empty(key.shape[0], self.capacity, key.shape[2])
            self.v[layer] = value.new_empty(value.shape[0], self.capacity, value.shape[2])
        end = self.length + key.shape[1]
        self.k[layer][:, self.length : end] = key
        self.v[layer][:, self.length : end] = value
        return self.k[layer][None, :, :end], self.v[layer][None, :, :end]


class MaskRule:
    """What the model asked of its mask builder for one mask type in one forward; each row's mask is built once."""

    def __init__(self, kwargs: dict):
        self.kwargs = kwargs  # mask_function (causal, sliding window...), skip rules, local_size, dtype, device...
        self.rows: dict[int, object] = {}

    def row(self, b: int, past: int, new: int, build):
        """The mask of row b (`past` positions in its buffer, `new` this forward), from the original builder."""
        if b not in self.rows:
            self.rows[b] = build(
                batch_size=1, q_length=new, kv_length=past + new, q_offset=past, kv_offset=0, **self.kwargs
            )
        return self.rows[b]


def record_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs) -> MaskRule:
    """The mask builder registered for ATTN_NAME: the engine passes no padding mask and no cache, only positions."""
    if attention_mask is not None or q_offset or kv_offset:
        raise ValueError("ragged attention takes no padding mask and no cache")
    return MaskRule(kwargs)


def ragged_attention(module, query, key, value, attention_mask, functok_rows=(), functok_ragged=None, **kwargs):
    """The attention function registered for ATTN_NAME; see `RaggedAttention.attend`."""
    if functok_ragged is None:
        raise ValueError("a model switched to ragged attention needs functok_rows and functok_ragged in its forward")
    return functok_ragged.attend(module, query, key, value, attention_mask, functok_rows, kwargs)


class RaggedAttention:
    """Switches one model instance (not others) to ragged attention; its forwards then take `forward_kwargs(rows)`."""

    def __init__(self, model):
        go_offline()
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.model, self.name = model, type(model).__name__
        self.impl = model.config._attn_implementation  # what the model was loaded with: sdpa, eager, flash...
        if self.impl == ATTN_NAME or self.impl not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise UnsupportedModel(f"{self.name}: attention implementation {self.impl!r} has no mask builder")
        self._masks, self._attention = ALL_MASK_ATTENTION_FUNCTIONS, ALL_ATTENTION_FUNCTIONS
        self._fns: dict[type, object] = {}  # attention module class -> the function it would call
        self._seen: dict[type, set[str]] = {}  # attention module class -> score keywords it passes (probe only)
        self.calls: list[int] | None = None  # layer of each attention call of the current forward (probe only)
        AttentionInterface.register(ATTN_NAME, ragged_attention)
        AttentionMaskInterface.register(ATTN_NAME, record_mask)
        model.set_attn_implementation(ATTN_NAME)
        try:
            self._check()
        except UnsupportedModel:
            raise
        except Exception as e:  # anything the family does that ragged attention cannot follow
            why = " ".join(f"{type(e).__name__}: {e}".split())
            raise UnsupportedModel(f"{self.name}: ragged attention cannot run this model ({why})") from e
        finally:
            self.calls = None

    def forward_kwargs(self, rows: list[KVBuffer | None]) -> dict:
        """Extra keywords for one forward whose batch row b reads and extends rows[b] (None: a filler row)."""
        return {"functok_rows": rows, "functok_ragged": self}

    def attend(self, module, query, key, value, attention_mask, rows, kwargs):
        """Row b's new keys/values go into rows[b]; it attends to its own buffer (None: a filler row, output zeros).

        query (batch, heads, new, head_dim); key, value (batch, kv_heads, new, head_dim) as the layer made them (after
        RoPE, norms...). Returns (batch, new, heads, v_head_dim), what the layer's output projection expects.
        """
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int):
            raise UnsupportedModel(f"{self.name}: {type(module).__name__} has no layer_idx")
        if not isinstance(attention_mask, MaskRule):
            raise UnsupportedModel(f"{self.name}: {type(module).__name__} got a mask not built by masking_utils")
        fn = self._fn(module)
        if self.calls is not None:
            self.calls.append(layer)
            self._seen.setdefault(type(module), set()).update(k for k in SCORE_KWARGS if kwargs.get(k) is not None)
        new, out = query.shape[2], None
        build = self._masks[self.impl]
        for b, kv in enumerate(rows):
            if kv is None:
                continue
            k, v = kv.write(layer, key[b], value[b])
            mask = attention_mask.row(b, kv.length, new, build)
            o = fn(module, query[b : b + 1], k, v, mask, **kwargs)[0]  # (1, new, heads, v_head_dim)
            if out is None:
                out = o.new_zeros(query.shape[0], *o.shape[1:])
            out[b] = o[0]
        if out is None:  # only filler rows
            out = query.new_zeros(query.shape[0], new, query.shape[1], value.shape[-1])
        return out, None

    def _fn(self, module):
        """The attention function this module's own code would call under the original implementation."""
        cls = type(module)
        if cls not in self._fns:
            scope = inspect.unwrap(cls.forward).__globals__  # the family's modeling module
            eager = scope.get("eager_attention_forward")
            if self.impl == "eager" and eager is None:
                raise UnsupportedModel(f"{self.name}: {cls.__name__} has no eager_attention_forward")
            if self.impl == "eager" and getattr(module, "reorder_and_upcast_attn", False):
                raise UnsupportedModel(f"{self.name}: reorder_and_upcast_attn bypasses the attention interface")
            self._fns[cls] = scope.get("ALL_ATTENTION_FUNCTIONS", self._attention).get_interface(self.impl, eager)
        return self._fns[cls]

    def _check(self) -> None:
        """Prove on a probe that this model computes here what its plain forward computes; raise otherwise."""
        model, n = self.model, PROBE_PREFILL + PROBE_DECODE
        ids = torch.arange(1, n + 1, device=model.device) % model.config.vocab_size  # (n,)
        with torch.inference_mode():
            self._ragged_logits(ids[:PROBE_PREFILL])  # which score keywords each attention passes
            for cls, names in self._seen.items():
                ignored = [k for k in names if k not in inspect.signature(self._fns[cls]).parameters]
                if ignored and self.impl != "eager":
                    log.warning("%s: %s ignores %s; using the family's eager attention", self.name, self.impl, ignored)
                    self.impl, self._fns = "eager", {}
            model.set_attn_implementation(self.impl)
            try:
                pos = torch.arange(n, device=model.device)[None]
                want = model(input_ids=ids[None], position_ids=pos, use_cache=False).logits[0, PROBE_PREFILL - 1 :]
            finally:
                model.set_attn_implementation(ATTN_NAME)
            got = self._ragged_logits(ids)
        scale = want.float().abs().max().clamp(min=1.0)
        diff = float((got.float() - want.float()).abs().max() / scale)
        if not diff <= PROBE_TOL.get(want.dtype, 0.1):
            raise UnsupportedModel(f"{self.name}: ragged attention differs from the plain forward by {diff:.2e}")

    def _ragged_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Last-position logits of a ragged prefill of the first PROBE_PREFILL ids, then of each decode step."""
        layers = len(decoder_layers(self.model))
        kv, out = KVBuffer(len(ids)), []
        for chunk in [ids[:PROBE_PREFILL], *ids[PROBE_PREFILL:, None]]:
            self.calls = []
            pos = torch.arange(kv.length, kv.length + len(chunk), device=ids.device)[None]
            logits = self.model(input_ids=chunk[None], position_ids=pos, use_cache=False, **self.forward_kwargs([kv]))
            if sorted(self.calls) != list(range(layers)):
                raise UnsupportedModel(
                    f"{self.name}: attention calls per forward by layer {sorted(self.calls)}, not one for each of its "
                    f"{layers} decoder layers (some attention bypasses transformers' attention interface)"
                )
            kv.length += len(chunk)
            out.append(logits.logits[0, -1])
        return torch.stack(out)  # (1 + decode steps, vocab)
