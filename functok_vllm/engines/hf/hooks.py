"""The transformers engine's start-up probe of hook points, and model loading.

`check_hook_points` proves on a probe, for any family, that the modules `engines.placement` hooks are what the hook
names say (the layer's output is its input plus the two contributions; for `resid_mid`, the MLP reads the stream
after attention), and refuses a model where they are not, naming its class and the hook, rather than apply an SAE in
the wrong place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from functok_vllm.core.hookpoint import HookPoint
from functok_vllm.engines.placement import decoder_layers, flat, hooked
from functok_vllm.offline import go_offline

PROBE_TOL = 1e-4  # |layer output - (input + attention + MLP)| / max |output| on the probe, in float32


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


def _probe_hooks(layers, inner: list[int], grab, nudge: int | None = None):
    """Probe hooks of `check_hook_points`: record each inner layer's input, site outputs and output."""
    at = []
    for L in inner:
        at.append((HookPoint(L, "resid_pre"), flat(grab(("in", L)))))
        at.append((HookPoint(L, "resid_post"), flat(grab(("out", L)))))
        for site in ("attn_out", "mlp_out"):
            at.append((HookPoint(L, site), flat(grab((site, L)))))
        if nudge == L:
            at.append((HookPoint(L, "attn_out"), flat(lambda t: t + 1.0)))
    return hooked(layers, at)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from a Hugging Face directory, offline, in eval mode."""
    go_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, tok
