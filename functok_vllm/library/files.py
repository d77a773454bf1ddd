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

**Untrusted bytes.** Both readers bound their work by the bytes actually present before a parser walks them: a GGUF's
header is scanned first (`scan_gguf`: every declared count and length checked against the bytes that follow it, and
at most `MAX_KV` fields, `MAX_TENSORS` tensors, `MAX_STRING_ITEMS` string-array items), then read by the `gguf`
package; a safetensors header's declared length and tensor count are checked before `safetensors` reads it (which
checks every offset against the buffer). Metadata kept in the library's index is bounded (`MAX_HINT_BYTES`).
"""

from __future__ import annotations

import json
import math
import re
import struct
import tempfile

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load

from functok_vllm.core.hookpoint import HookError, HookPoint, parse_hook_name

DIRECTION = re.compile(r"direction\.(\d+)")
MAX_KV = 256  # metadata fields in a GGUF (a control vector has 3 or 4; a model file has ~30 plus its vocabulary)
MAX_TENSORS = 1024  # tensors in one file: one direction per layer, and no model has 1024 layers
MAX_STRING_ITEMS = 4096  # items of string arrays in a GGUF (a control vector has none; a vocabulary is refused)
MAX_KEY_BYTES = 1024  # a metadata key or tensor name
MAX_HINT_BYTES = 256  # controlvector.model_hint, kept in the library's index (the hint names a model type: "llama")
GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_INTEGERS = (0, 1, 2, 3, 4, 5, 10, 11)


class FileError(ValueError):
    """An uploaded file that is not a usable vector; the message names the problem (the server answers 400)."""


def read_vector_file(data: bytes, d_model: int) -> tuple[dict[str, torch.Tensor], dict]:
    """({hook: direction}, what the file says about itself) from a GGUF control vector or a safetensors file."""
    if data[:4] == b"GGUF":
        return read_gguf(data, d_model)
    if len(data) > 8 and data[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return read_safetensors(data, d_model), {"format": "safetensors"}
    raise FileError("the file is neither a GGUF control vector nor a safetensors file (by its first bytes)")


class _Cursor:
    """Reads a GGUF header from `data`, refusing any read past its end (FileError naming `where`)."""

    def __init__(self, data: bytes, order: str):
        self.data, self.order, self.at = data, order, 0

    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, fmt: str, where: str):
        size = struct.calcsize(fmt)
        if size > self.left():
            raise FileError(f"{where}: the file ends after {len(self.data)} bytes (truncated)")
        value = struct.unpack_from(self.order + fmt, self.data, self.at)[0]
        self.at += size
        return value

    def skip(self, n: int, where: str, what: str) -> None:
        if n > self.left():
            raise FileError(f"{where}: declares {what} ({n} bytes) but only {self.left()} bytes follow")
        self.at += n

    def string(self, where: str, limit: int | None = None) -> bytes:
        n = self.take("Q", where)
        if limit is not None and n > limit:
            raise FileError(f"{where}: a string of {n} bytes; at most {limit} are read")
        start = self.at
        self.skip(n, where, f"a string of {n} bytes")
        return self.data[start : self.at]


def scan_gguf(data: bytes) -> None:
    """Walk a GGUF's header (metadata and tensor infos) checking every count and length against the bytes present,
    so that a reader walking it after us does bounded work; FileError naming the first problem."""
    if len(data) < 24:
        raise FileError(f"a GGUF header is 24 bytes at least; the file has {len(data)}")
    order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"  # as the gguf reader detects byte order
    c = _Cursor(data, order)
    c.at = 4
    version = c.take("I", "version")
    if version not in (2, 3):
        raise FileError(f"GGUF version {version}; versions 2 and 3 are read")
    n_tensors, n_kv = c.take("Q", "tensor count"), c.take("Q", "metadata count")
    if n_kv > MAX_KV:
        raise FileError(f"the GGUF declares {n_kv} metadata fields; a control vector has a few (at most {MAX_KV})")
    if n_tensors > MAX_TENSORS:
        raise FileError(f"the GGUF declares {n_tensors} tensors; at most {MAX_TENSORS} are read")
    items = 0
    for i in range(n_kv):
        key = c.string(f"metadata field {i}", MAX_KEY_BYTES).decode("utf-8", errors="replace")
        kind = c.take("I", key)
        count, where = 1, key
        if kind == GGUF_ARRAY:
            kind, count = c.take("I", key), c.take("Q", key)
            where = f"metadata {key}"
        if kind == GGUF_STRING:
            items += count if count > 1 else 0
            if count > 1 and items > MAX_STRING_ITEMS:
                raise FileError(f"metadata {key}: more than {MAX_STRING_ITEMS} strings in arrays")
            if 8 * count > c.left():
                raise FileError(f"{where}: declares {count} strings but only {c.left()} bytes follow")
            for _ in range(count):
                c.string(where)
        elif kind in GGUF_SIZES:
            c.skip(count * GGUF_SIZES[kind], where, f"{count} values of {GGUF_SIZES[kind]} bytes")
        else:
            raise FileError(f"metadata {key}: value type {kind} is not a GGUF scalar or string (nested arrays?)")
    for i in range(n_tensors):
        name = c.string(f"tensor {i}", MAX_KEY_BYTES).decode("utf-8", errors="replace")
        dims = c.take("I", name)
        if not 1 <= dims <= 4:
            raise FileError(f"tensor {name!r}: {dims} dimensions")
        shape = [c.take("Q", name) for _ in range(dims)]
        c.skip(4 + 8, name, "a type and an offset")
        if math.prod(shape) > 4 * len(data):  # no GGML type stores an element in less than a quarter byte
            raise FileError(f"tensor {name!r}: shape {shape} holds more elements than {len(data)} bytes can")


def read_gguf(data: bytes, d_model: int) -> tuple[dict[str, torch.Tensor], dict]:
    from gguf import GGMLQuantizationType, GGUFReader

    scan_gguf(data)
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:  # the reader memory-maps a file
        f.write(data)
        f.flush()
        try:
            reader = GGUFReader(f.name)
        except Exception as e:  # a malformed file fails anywhere in the reader: ValueError, IndexError, KeyError...
            raise FileError(f"not a readable GGUF file ({type(e).__name__}: {e})") from None
        arch = _text(reader, "general.architecture", MAX_KEY_BYTES)
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
        meta = {"format": "gguf", "model_hint": _text(reader, "controlvector.model_hint", MAX_HINT_BYTES)}
        count = reader.get_field("controlvector.layer_count")
        if count is not None:
            if len(count.types) != 1 or count.types[0] not in GGUF_INTEGERS:
                shown = "a string" if count.types[:1] == [GGUF_STRING] else repr(count.parts[-1].tolist()[:1])
                raise FileError(f"controlvector.layer_count must be a whole number, got {shown}")
            meta["layer_count"] = int(count.parts[-1][0])
    return out, meta


def check_safetensors_header(data: bytes) -> None:
    """FileError unless the declared header fits in the file, is a JSON object, and names at most MAX_TENSORS."""
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > len(data) - 8:
        raise FileError(f"the safetensors header declares {n} bytes but only {len(data) - 8} bytes follow")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as e:
        raise FileError(f"the safetensors header is not a JSON object ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise FileError("the safetensors header is not a JSON object")
    if len(header) - ("__metadata__" in header) > MAX_TENSORS:
        raise FileError(f"the safetensors file names {len(header)} tensors; at most {MAX_TENSORS} are read")


def read_safetensors(data: bytes, d_model: int) -> dict[str, torch.Tensor]:
    check_safetensors_header(data)
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


def _text(reader, key: str, limit: int) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.parts:
        return None
    if field.types != [GGUF_STRING]:
        raise FileError(f"{key} must be a string")
    raw = bytes(field.parts[-1])
    if len(raw) > limit:
        raise FileError(f"{key} has {len(raw)} bytes; at most {limit} are kept")
    return raw.decode("utf-8", errors="replace")
