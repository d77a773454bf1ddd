"""Steering vectors from uploaded files: llama.cpp control-vector GGUFs and safetensors files of per-layer directions.

Both give {canonical hook name: (d_model,) float32 tensor} (see `core.vector`), checked here: every tensor a 1-D float
direction of the model's width, finite, at a layer the name says.

**llama.cpp control vectors** (GGUF, written by llama.cpp's `cvector-generator` and by repeng's `export_gguf`):
`general.architecture` is `controlvector`; one F32 1-D tensor `direction.N` per steered layer, all n_embd long;
`controlvector.model_hint` (the model type, e.g. `llama`) and `controlvector.layer_count` (the number of directions)
are informative (llama.cpp does not read them; we keep them in the vector's `source`). llama.cpp adds `direction.N`
to the output of decoder block N (0-based: `build_cvec(cur, il)` after the block's last residual add, at every
position), and refuses N = 0; repeng writes `direction.N` for the direction it read from, and applies to, the output
of `model.layers[N]`. So `direction.N` maps to our hook `blocks.N.hook_resid_post`: the server's layer N for an SAE at
`blocks.N.hook_resid_post` or for `--steer-layers N`, layer N + 1 for an SAE at `blocks.N+1.hook_resid_pre` (the same
tensor). Other float types than F32 (F16, BF16, F64) are accepted and widened; quantised ones are refused.

**safetensors**: one 1-D float tensor per layer, named `direction.N` (as above, N >= 0) or by its hook point
(`blocks.N.hook_resid_post`, `blocks.N.hook_mlp_out`, `model.layers.N`, ...: `core.hookpoint`). The library's own
object files (`core.vector.Vector.to_bytes`) are such files.
"""

from __future__ import annotations

import re
import tempfile

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load

from functok_vllm.core.hookpoint import HookError, HookPoint, parse_hook_name

DIRECTION = re.compile(r"direction\.(\d+)")


class FileError(ValueError):
    """An uploaded file that is not a usable vector; the message names the problem (the server answers 400)."""


def read_vector_file(data: bytes, d_model: int) -> tuple[dict[str, torch.Tensor], dict]:
    """({hook: direction}, what the file says about itself) from a GGUF control vector or a safetensors file."""
    if data[:4] == b"GGUF":
        return read_gguf(data, d_model)
    if len(data) > 8 and data[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return read_safetensors(data, d_model), {"format": "safetensors"}
    raise FileError("the file is neither a GGUF control vector nor a safetensors file (by its first bytes)")


def read_gguf(data: bytes, d_model: int) -> tuple[dict[str, torch.Tensor], dict]:
    from gguf import GGMLQuantizationType, GGUFReader

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:  # the reader memory-maps a file
        f.write(data)
        f.flush()
        try:
            reader = GGUFReader(f.name)
        except Exception as e:  # a malformed file fails anywhere in the reader: ValueError, IndexError, KeyError...
            raise FileError(f"not a readable GGUF file ({type(e).__name__}: {e})") from None
        arch = _text(reader, "general.architecture")
        if arch != "controlvector":
            raise FileError(
                f"the GGUF's general.architecture is {arch!r}, not 'controlvector': it is not a llama.cpp control "
                "vector (a model or an adapter file?)"
            )
        out = {}
        for t in reader.tensors:
            m = DIRECTION.fullmatch(t.name)
            if not m:
                raise FileError(f"tensor {t.name!r}: a control vector holds only direction.N tensors")
            n = int(m.group(1))
            if n == 0:
                raise FileError(
                    "direction.0: llama.cpp numbers control-vector layers from 1 (direction.N is added to the output "
                    "of block N) and refuses layer 0"
                )
            if len(t.shape) != 1:
                raise FileError(f"{t.name} has shape {tuple(int(x) for x in t.shape)}; a direction is 1-D")
            kind = GGMLQuantizationType(t.tensor_type)
            if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64):
                values = np.array(t.data, dtype=np.float32).reshape(-1)
            elif kind == GGMLQuantizationType.BF16:
                values = (np.array(t.data, dtype=np.uint8).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                raise FileError(f"{t.name} is {kind.name}; a direction is F32 (or F16, BF16, F64)")
            out[HookPoint(n, "resid_post").name] = _direction(t.name, torch.from_numpy(values.copy()), d_model)
        if not out:
            raise FileError("the control vector holds no direction.N tensor")
        meta = {"format": "gguf", "model_hint": _text(reader, "controlvector.model_hint")}
        count = reader.get_field("controlvector.layer_count")
        if count is not None:
            meta["layer_count"] = int(count.parts[-1][0])
    return out, meta


def read_safetensors(data: bytes, d_model: int) -> dict[str, torch.Tensor]:
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise FileError(f"not a readable safetensors file ({e})") from None
    if not tensors:
        raise FileError("the safetensors file holds no tensor")
    out = {}
    for name, t in tensors.items():
        m = DIRECTION.fullmatch(name)
        try:
            hook = HookPoint(int(m.group(1)), "resid_post") if m else parse_hook_name(name)
        except HookError:
            raise FileError(
                f"tensor {name!r}: name a direction direction.N (added to the output of decoder layer N, as in "
                "llama.cpp) or by its hook point (blocks.N.hook_resid_post)"
            ) from None
        hook = hook.canonical().name
        if hook in out:
            raise FileError(f"tensor {name!r}: a second direction at {hook}")
        out[hook] = _direction(name, t, d_model)
    return out


def _direction(name: str, t: torch.Tensor, d_model: int) -> torch.Tensor:
    if not t.is_floating_point():
        raise FileError(f"{name} holds {t.dtype} numbers; a direction holds floats")
    if t.dim() != 1:
        raise FileError(f"{name} has shape {tuple(t.shape)}; a direction is 1-D")
    if t.shape[0] != d_model:
        raise FileError(f"{name} has {t.shape[0]} values; this model's d_model is {d_model}")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise FileError(f"{name} holds NaN or Inf")
    return t


def _text(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.parts:
        return None
    return bytes(field.parts[-1]).decode("utf-8", errors="replace")
