"""Temporary residual-stream hooks on a transformers model: attached in a context manager, removed in `finally`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from functok_vllm.offline import go_offline

# fn(h) gets the residual stream leaving a decoder layer, flattened to (tokens, d_model), and returns its
# replacement of the same shape, or None to leave it unchanged (capture only).
ResidualFn = Callable[[torch.Tensor], "torch.Tensor | None"]


# Where causal LMs keep their decoder layers: Llama, Mistral, Qwen2/3, Gemma-2, Phi-3 (`model.layers`), GPT-2
# (`transformer.h`), GPT-NeoX (`gpt_neox.layers`), multimodal wrappers (`model.language_model.layers`).
LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM: the first of LAYER_PATHS that names a non-empty ModuleList."""
    for path in LAYER_PATHS:
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for {', '.join(LAYER_PATHS)})")


def _wrap(fn: ResidualFn):
    def hook(_module, _args, out):
        h = out[0] if isinstance(out, tuple) else out  # transformers 5 returns a tensor, 4.x a tuple
        new = fn(h.reshape(-1, h.shape[-1]))  # (batch * seq, d_model)
        if new is None:
            return None
        new = new.view_as(h)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return hook


@contextmanager
def residual_hooks(model, fns: dict[int, ResidualFn]) -> Iterator[None]:
    """Run `fns[layer]` on the output of each named decoder layer for the duration of the `with` block."""
    layers = decoder_layers(model)
    handles = []
    try:
        for layer, fn in fns.items():
            handles.append(layers[layer].register_forward_hook(_wrap(fn)))
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
