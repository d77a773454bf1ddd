"""Where each SAE hook point lives in a decoder stack, for both engines: one function places temporary hooks that run a
callback on the tensor an SAE reads and put back what it returns.

The callback is `fn(module, hidden, residual) -> new hidden | None`: the tensor the SAE reads is `hidden + residual`
(`residual` None: `hidden` alone), `module` is the hooked module (`target`: where an engine keeps what the callback
needs, e.g. the steering tables) and the return value replaces `hidden` (None: unchanged, a read). Steering returns
`SteeringLayer.steered_hidden(hidden, residual)`, the one opaque op that adds the steering update in both engines;
capture and feature readouts record and return None.

- `resid_post` L, `resid_pre` L >= 1: decoder layer L (L - 1), a forward hook on its output;
- `resid_pre` 0 (the embeddings): decoder layer 0, a pre-hook on its `hidden_states` argument;
- `attn_out`, `mlp_out`: the attention / MLP module, or the norm after it (Gemma-2/3, OLMo-2), a forward hook;
- `resid_mid`, transformers: a forward hook on the attention module, whose output plus the layer's input (kept by a
  pre-hook on the layer) is the stream after attention;
- `resid_mid`, vLLM (`pairs`): a pre-hook on the fused add+norm the layer calls as (attention output, residual).

Outputs come as one tensor, a tuple whose first element is the tensor (transformers' attention), or, in vLLM
(`pairs=True`), a decoder layer's `(hidden, residual)` pair whose sum is the stream. Hooks placed before vLLM compiles
the model are traced into its graph (Dynamo inlines module hooks); the tensors they read are module buffers updated
in place. No class of the model is changed and no module is renamed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from functok_vllm.core.hookpoint import HookPoint, site_module_name

StreamFn = Callable[[torch.nn.Module, torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]
ResidualFn = Callable[[torch.Tensor], "torch.Tensor | None"]  # (tokens, d_model) -> replacement or None

# Where causal LMs keep their decoder layers: Llama, Mistral, Qwen2/3, Gemma-2, Phi-3 and vLLM's models
# (`model.layers`), GPT-2 (`transformer.h`), GPT-NeoX (`gpt_neox.layers`), multimodal wrappers.
LAYER_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.language_model.layers",
    "language_model.model.layers",
)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM: the first of LAYER_PATHS that names a non-empty ModuleList."""
    for path in LAYER_PATHS:
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for {', '.join(LAYER_PATHS)})")


def site_module(layer: torch.nn.Module, site: str) -> torch.nn.Module:
    """The module of one decoder layer whose output is what the layer adds to the stream at `attn_out`/`mlp_out`."""
    return getattr(layer, site_module_name(layer, site))


def layer_of(point: HookPoint) -> int:
    """The decoder layer that holds `point`'s hooks (a pipeline-parallel rank holds only some layers)."""
    out = point.output_of()
    return out if out is not None else (0 if point.site == "resid_pre" else point.layer)


def target(layers, point: HookPoint, pairs: bool = False) -> torch.nn.Module:
    """The module whose hook calls the callback for `point` (see the table above); ValueError where the point has no
    such module in this model (vLLM: a `resid_mid` without a fused add+norm)."""
    if point.output_of() is not None:
        return layers[point.output_of()]
    if point.site == "resid_pre":
        return layers[0]
    layer = layers[point.layer]
    if point.site != "resid_mid":
        return site_module(layer, point.site)
    if not pairs:
        return site_module(layer, "attn_out")
    name = "pre_feedforward_layernorm" if hasattr(layer, "post_feedforward_layernorm") else "post_attention_layernorm"
    norm = getattr(layer, name, None)
    if not _takes_residual(norm):
        raise ValueError(f"{type(layer).__name__} adds its attention output to the stream inside its own code")
    return norm


def attach(layers, point: HookPoint, fn: StreamFn, pairs: bool = False) -> list:
    """Register the hooks that run `fn` at `point`; their handles (remove them to undo). `pairs`: vLLM's layers, whose
    outputs are (hidden, residual) pairs and whose resid_mid is a fused add+norm."""
    mod = target(layers, point, pairs)
    if point.site == "resid_pre" and point.output_of() is None:
        i = hidden_states_index(mod)

        def before(m, args, kwargs):
            if len(args) > i:
                new = fn(m, args[i], None)
                return None if new is None else ((*args[:i], new, *args[i + 1 :]), kwargs)
            new = fn(m, kwargs["hidden_states"], None)
            return None if new is None else (args, kwargs | {"hidden_states": new})

        return [mod.register_forward_pre_hook(before, with_kwargs=True)]
    if point.site == "resid_mid" and pairs:

        def fused(m, args, kwargs):  # the norm is called as (x, residual), positionally or by keyword
            x = args[0] if args else kwargs["x"]
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            new = fn(m, x, residual)
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, kwargs | {"x": new})

        return [mod.register_forward_pre_hook(fused, with_kwargs=True)]
    if point.site == "resid_mid":
        stash = {}  # the layer's input, kept from its pre-hook to its attention's output

        def keep(_m, args, kwargs):
            stash["h"] = args[0] if args else kwargs["hidden_states"]

        def mid(m, _args, out):
            a = _first(out)
            new = fn(m, a, stash.pop("h"))  # the stream after attention: the layer's input + the attention output
            return None if new is None else _replace(out, new)

        return [
            layers[point.layer].register_forward_pre_hook(keep, with_kwargs=True),
            mod.register_forward_hook(mid),
        ]
    is_layer = point.output_of() is not None

    def after(m, _args, out):
        if pairs and is_layer and isinstance(out, tuple) and len(out) == 2 and out[1] is not None:
            new = fn(m, out[0], out[1])
            return None if new is None else (new, out[1])
        new = fn(m, _first(out), None)
        return None if new is None else _replace(out, new)

    return [mod.register_forward_hook(after)]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _takes_residual(mod) -> bool:
    """Is `mod` a norm with vLLM's fused residual add (RMSNorm(x, residual) -> (normed x + residual, x + residual))?
    A vLLM CustomOp's `forward` takes *args and dispatches to `forward_native`, whose signature says."""
    if not isinstance(mod, torch.nn.Module):
        return False
    fn = getattr(type(mod), "forward_native", None) or type(mod).forward
    return "residual" in inspect.signature(fn).parameters


def hidden_states_index(module: torch.nn.Module) -> int:
    """Position of `hidden_states` among the positional arguments of the module's forward (vLLM's Llama: 1; GPT-2 and
    transformers' layers: 0)."""
    names = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
    if "hidden_states" not in names:
        raise ValueError(f"{type(module).__name__}.forward takes no hidden_states")
    return names.index("hidden_states")


def flat(fn: ResidualFn) -> StreamFn:
    """A callback on the stream itself, flattened to (tokens, d_model), as a `StreamFn` (reads and replacements of
    the whole stream; the replacement's difference moves `hidden`)."""

    def stream_fn(_m, hidden, residual):
        h = hidden if residual is None else hidden + residual
        new = fn(h.reshape(-1, h.shape[-1]))
        if new is None:
            return None
        return new.view_as(hidden) if residual is None else hidden + (new.view_as(h) - h)

    return stream_fn


@contextmanager
def hooked(layers, fns: list[tuple[HookPoint, StreamFn]], pairs: bool = False) -> Iterator[None]:
    """Each (point, fn) attached for the `with` block, removed in `finally` (hooks are temporary)."""
    handles = []
    try:
        for point, fn in fns:
            handles += attach(layers, point, fn, pairs)
        yield
    finally:
        for h in handles:
            h.remove()


def residual_hooks(model, fns: dict[int, ResidualFn], points: dict[int, HookPoint] | None = None):
    """Run `fns[layer]` on the (tokens, d_model) stream at `points[layer]` (default: the output of decoder layer
    `layer`) for the `with` block; a function's return value (None: unchanged) replaces that tensor."""
    at = [((points or {}).get(layer) or HookPoint(layer, "resid_post"), flat(fn)) for layer, fn in fns.items()]
    return hooked(decoder_layers(model), at)
