"""Temporary hooks at SAE hook points of a transformers model: attached in a context manager, removed in `finally`.

Each function runs on the tensor an SAE reads at its hook point (`core.hookpoint`), flattened to (tokens, d_model),
and returns its replacement (or None: unchanged, capture only):

- `resid_post` L: the output of decoder layer L; `resid_pre` L: the output of layer L - 1, or for L = 0 the input of
  layer 0 (the embeddings);
- `attn_out` / `mlp_out` L: the output of the module whose result layer L adds to the stream: the attention or MLP
  module, or, in families with norms after them (Gemma-2/3, OLMo-2: `post_feedforward_layernorm`), those norms;
- `resid_mid` L: the layer's input plus its attention output; a replacement h' moves the attention output by h' - h.

`check_hook_points` proves on a probe, for any family, that these modules are what the names say (the layer's output
is its input plus the two contributions; for `resid_mid`, the MLP reads the stream after attention), and refuses a
model where they are not, naming its class and the hook, rather than apply an SAE in the wrong place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from functok_vllm.core.hookpoint import HookPoint, site_module_name
from functok_vllm.offline import go_offline

ResidualFn = Callable[[torch.Tensor], "torch.Tensor | None"]

# Where causal LMs keep their decoder layers: Llama, Mistral, Qwen2/3, Gemma-2, Phi-3 (`model.layers`), GPT-2
# (`transformer.h`), GPT-NeoX (`gpt_neox.layers`), multimodal wrappers (`model.language_model.layers`).
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")
PROBE_TOL = 1e-4  # |layer output - (input + attention + MLP)| / max |output| on the probe, in float32


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


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


def _apply(fn: ResidualFn, t: torch.Tensor) -> torch.Tensor | None:
    new = fn(t.reshape(-1, t.shape[-1]))  # (batch * seq, d_model)
    return None if new is None else new.view_as(t)


def _out_hook(fn: ResidualFn):
    def hook(_module, _args, out):
        new = _apply(fn, _first(out))
        return None if new is None else _replace(out, new)

    return hook


def _in_hook(fn: ResidualFn):
    def hook(_module, args, kwargs):
        if args:
            new = _apply(fn, args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = _apply(fn, kwargs["hidden_states"])
        return None if new is None else (args, kwargs | {"hidden_states": new})

    return hook


def _attach(layers, point: HookPoint, fn: ResidualFn) -> list:
    """Register the hooks that run `fn` at `point`; their handles."""
    L, site = point.layer, point.site
    if site == "resid_post" or (site == "resid_pre" and L > 0):
        return [layers[point.output_of()].register_forward_hook(_out_hook(fn))]
    if site == "resid_pre":
        return [layers[0].register_forward_pre_hook(_in_hook(fn), with_kwargs=True)]
    if site in ("attn_out", "mlp_out"):
        return [site_module(layers[L], site).register_forward_hook(_out_hook(fn))]
    stash = {}  # resid_mid: the layer's input, kept from its pre-hook to its attention's output

    def keep(_module, args, kwargs):
        stash["h"] = args[0] if args else kwargs["hidden_states"]

    def mid(_module, _args, out):
        a = _first(out)
        h = stash.pop("h") + a  # the stream after attention
        new = _apply(fn, h)
        return None if new is None else _replace(out, a + (new - h))

    return [
        layers[L].register_forward_pre_hook(keep, with_kwargs=True),
        site_module(layers[L], "attn_out").register_forward_hook(mid),
    ]


@contextmanager
def residual_hooks(model, fns: dict[int, ResidualFn], points: dict[int, HookPoint] | None = None) -> Iterator[None]:
    """Run `fns[layer]` at `points[layer]` (default: the output of decoder layer `layer`) for the `with` block."""
    layers = decoder_layers(model)
    handles = []
    try:
        for layer, fn in fns.items():
            handles += _attach(layers, (points or {}).get(layer) or HookPoint(layer, "resid_post"), fn)
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def check_hook_points(model, points: list[HookPoint]) -> None:
    """ValueError naming the model's class and the hook unless, on a probe, every point is what its name says."""
    inner = sorted({p.layer for p in points if not p.output_of() and not (p.site == "resid_pre" and p.layer == 0)})
    if not inner:
        return
    name, layers = type(model).__name__, decoder_layers(model)
    ids = (torch.arange(1, 9, device=model.device) % model.config.vocab_size)[None]  # (1, 8)
    seen: dict = {}

    def grab(key):
        return lambda t: seen.__setitem__(key, t.clone())

    def run(nudge=None) -> dict:
        seen.clear()
        with _probe_hooks(layers, inner, grab, nudge):
            model(input_ids=ids, use_cache=False)
        return dict(seen)

    try:
        base = run()
        for L in inner:
            total = base[("in", L)] + base[("attn_out", L)] + base[("mlp_out", L)]
            err = float((total - base[("out", L)]).abs().max() / base[("out", L)].abs().max().clamp(min=1e-6))
            if not err <= PROBE_TOL:
                raise ValueError(f"layer {L}'s output is not its input plus its attention and MLP outputs ({err:.1e})")
        for L in sorted({p.layer for p in points if p.site == "resid_mid"}):
            moved = run(L)  # a nudge to layer L's attention output must reach its MLP: a sequential residual
            if torch.equal(moved[("mlp_out", L)], base[("mlp_out", L)]):
                raise ValueError(f"layer {L}'s MLP does not read the stream after its attention (parallel residual)")
    except (ValueError, KeyError, RuntimeError) as e:
        sites = ", ".join(sorted({p.name for p in points if p.layer in inner}))
        raise ValueError(f"{name}: cannot apply SAEs at {sites}: {e}") from None


@contextmanager
def _probe_hooks(layers, inner: list[int], grab, nudge: int | None = None) -> Iterator[None]:
    """Probe hooks of `check_hook_points`: record each inner layer's input, site outputs and output."""
    handles = []
    try:
        for L in inner:
            handles.append(layers[L].register_forward_pre_hook(_in_hook(grab(("in", L))), with_kwargs=True))
            handles.append(layers[L].register_forward_hook(_out_hook(grab(("out", L)))))
            for site in ("attn_out", "mlp_out"):
                mod = site_module(layers[L], site)
                handles.append(mod.register_forward_hook(_out_hook(grab((site, L)))))
            if nudge == L:
                attn = site_module(layers[L], "attn_out")
                handles.append(attn.register_forward_hook(_out_hook(lambda t: t + 1.0)))
        yield
    finally:
        for h in handles:
            h.remove()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from a Hugging Face directory, offline, in eval mode."""
    go_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, tok
