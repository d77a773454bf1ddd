"""Hook points: where in a decoder block an SAE reads (and functok steers), parsed from the SAE's hook name.

An SAE is trained on one tensor of the model, named by SAELens/TransformerLens (`blocks.L.hook_resid_post`) or by a
Hugging Face module path (`model.layers.L`, `model.layers.L.mlp`). functok applies the SAE where it reads:

| site         | the tensor                                                        | TransformerLens name        |
|--------------|-------------------------------------------------------------------|-----------------------------|
| `resid_pre`  | the residual stream entering block L (block 0: the embeddings)    | `blocks.L.hook_resid_pre`   |
| `resid_mid`  | the stream after block L's attention was added, before its MLP    | `blocks.L.hook_resid_mid`   |
| `resid_post` | the stream leaving block L (a decoder layer's output)             | `blocks.L.hook_resid_post`  |
| `attn_out`   | what block L's attention adds to the stream (after any post-norm) | `blocks.L.hook_attn_out`    |
| `mlp_out`    | what block L's MLP adds to the stream (after any post-norm)       | `blocks.L.hook_mlp_out`     |

Adding a vector at `attn_out`/`mlp_out`/`resid_mid` adds it to the stream downstream of that point; clamping encodes the
tensor the SAE reads, which differs from site to site. Anything else (per-head `attn.hook_z`, `hook_q`, MLP
pre-activations, transcoders that read one tensor and write another) is refused with `SAELoadError` naming the hook.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")

_TL = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)")
# Hugging Face module paths: a decoder layer's output, or the output of its attention / MLP module.
_HF = re.compile(
    r"(?:model\.language_model\.|model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)"
    r"(?:\.(self_attn|attn|attention|mlp))?"
)
_HF_SITE = {None: "resid_post", "self_attn": "attn_out", "attn": "attn_out", "attention": "attn_out", "mlp": "mlp_out"}


ATTN_NAMES = ("self_attn", "attn", "attention")  # a decoder layer's attention module, by family


class HookError(ValueError):
    """A hook name functok cannot apply an SAE at (the caller adds the file it came from)."""


@dataclass(frozen=True)
class HookPoint:
    layer: int  # the block index L of the name
    site: str  # one of SITES

    def __post_init__(self):
        if self.site not in SITES:
            raise HookError(f"site {self.site!r} is not one of {', '.join(SITES)}")
        if self.layer < 0:
            raise HookError(f"layer {self.layer} is negative")

    @property
    def name(self) -> str:
        """The canonical TransformerLens name, e.g. `blocks.9.hook_mlp_out`."""
        return f"blocks.{self.layer}.hook_{self.site}"

    @property
    def on_stream(self) -> bool:
        """Does the SAE read the residual stream itself (rather than one block's attention or MLP output)?"""
        return self.site.startswith("resid_")

    def canonical(self) -> HookPoint:
        """The one name of this tensor: `resid_pre` L >= 1 is the output of layer L - 1 (`resid_post` L - 1)."""
        out = self.output_of()
        return HookPoint(out, "resid_post") if out is not None else self

    def output_of(self) -> int | None:
        """The decoder layer whose output is this exact tensor (resid_post L, or resid_pre L >= 1: the output of
        layer L - 1); None when it is no decoder layer's output (the embeddings, a block's inner points)."""
        if self.site == "resid_post":
            return self.layer
        if self.site == "resid_pre" and self.layer > 0:
            return self.layer - 1
        return None


def parse_hook_name(name: str) -> HookPoint:
    """`blocks.9.hook_resid_post` or `model.layers.9` -> HookPoint(9, "resid_post"); HookError for anything else."""
    m = _TL.fullmatch(name)
    if m:
        return HookPoint(int(m.group(1)), m.group(2))
    m = _HF.fullmatch(name)
    if m:
        return HookPoint(int(m.group(1)), _HF_SITE[m.group(2)])
    if not name:
        raise HookError("the SAE names no hook point (cfg.json metadata.hook_name is empty)")
    why = (
        "a per-head tensor (hook_z and friends carry a head axis functok does not steer)"
        if re.search(r"hook_(z|q|k|v|pattern|attn_scores|result)\b", name)
        else "not a point functok reads"
    )
    raise HookError(
        f"hook point {name!r} is not supported: {why}; functok applies SAEs at blocks.L.hook_" + "/".join(SITES)
    )


def site_module_name(layer, site: str) -> str:
    """The attribute of a decoder layer (a transformers or a vLLM module) whose output is what the layer adds to the
    stream at `attn_out` / `mlp_out`: its attention or MLP module, or, in families with norms after them (Gemma-2/3,
    OLMo-2: `post_feedforward_layernorm`), those norms. HookError if the layer has none."""
    sandwich = hasattr(layer, "post_feedforward_layernorm")
    if site == "mlp_out":
        name = "post_feedforward_layernorm" if sandwich else "mlp"
    else:
        name = "post_attention_layernorm" if sandwich else next((n for n in ATTN_NAMES if hasattr(layer, n)), "")
    if not name or not hasattr(layer, name):
        raise HookError(f"{type(layer).__name__} has no module for {site} (looked for {name or ATTN_NAMES})")
    return name
