"""Steering vectors as content: immutable float32 directions at hook points, named by a hash of exactly that content.

A `Vector` maps canonical hook names (`blocks.L.hook_resid_post`, see `HookPoint.canonical`) to one (d_model,) float32
direction each. Its `id` is a hash of the hook names and the float32 bytes, so two vectors with the same id add the
same numbers at the same tensors: a steering spec names a vector by id (`SteeringSpec.key()`), equal specs share a
slot, and vLLM's prefix-cache salt can never mix two versions of a vector that was changed under one name.

Serialised forms (both verified against the id when read back):
- `to_bytes` / `from_bytes`: a safetensors file (the store's objects, `functok_vllm.library.store`);
- `payload` / `from_payload`: base64 text per hook, what travels to vLLM's workers in `extra_args`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from functok_vllm.core.hookpoint import HookError, parse_hook_name

FORMAT = "functok.vector.v1"
ID_HEX = 32  # 128 bits of sha256
# Largest direction norm: its square must stay finite in float32, which every RMSNorm / LayerNorm after the edit
# computes (sum of squares); a longer direction can only turn the model's activations into inf and NaN.
MAX_NORM = float(torch.finfo(torch.float32).max) ** 0.5  # ~1.8e19


class VectorError(ValueError):
    """A vector that cannot be built or read: empty, ragged, not finite, a bad hook name, a corrupt file."""


def canonical_hook(name: str) -> str:
    """The canonical name of the tensor `name` denotes (`blocks.3.hook_resid_pre` -> `blocks.2.hook_resid_post`)."""
    try:
        return parse_hook_name(name).canonical().name
    except HookError as e:
        raise VectorError(str(e)) from None


def content_id(directions: Mapping[str, torch.Tensor]) -> str:
    """Hash of the hook names and the float32 little-endian bytes of their directions, in hook-name order."""
    h = hashlib.sha256(FORMAT.encode() + b"\0")
    for hook in sorted(directions):
        t = directions[hook]
        h.update(hook.encode() + b"\0" + t.shape[0].to_bytes(8, "little"))
        h.update(t.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()[:ID_HEX]


@dataclass(frozen=True, eq=False)
class Vector:
    id: str
    directions: Mapping[str, torch.Tensor]  # canonical hook name -> (d_model,) float32 on the CPU; never mutated

    @classmethod
    def make(cls, directions: Mapping[str, torch.Tensor]) -> Vector:
        """From {hook name: 1-D tensor}: VectorError unless non-empty, one length, finite, hook names distinct."""
        if not directions:
            raise VectorError("a vector needs a direction at one layer at least")
        out: dict[str, torch.Tensor] = {}
        for name, t in directions.items():
            hook = canonical_hook(name)
            if hook in out:
                raise VectorError(f"two directions at {hook} (as {name!r})")
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] == 0:
                raise VectorError(f"{hook}: a direction is a non-empty 1-D tensor")
            d = t.detach().to("cpu", torch.float32).contiguous().clone()
            if not torch.isfinite(d).all():
                raise VectorError(f"{hook}: the direction holds NaN or Inf")
            norm = float(d.double().norm())
            if norm > MAX_NORM:
                raise VectorError(
                    f"{hook}: the direction's norm {norm:.3g} is above {MAX_NORM:.3g}, where its square overflows "
                    "float32 (every norm layer after it would compute inf)"
                )
            out[hook] = d
        dims = {t.shape[0] for t in out.values()}
        if len(dims) > 1:
            raise VectorError(f"the directions have different lengths ({sorted(dims)})")
        ordered = dict(sorted(out.items()))
        return cls(content_id(ordered), ordered)

    @property
    def d_model(self) -> int:
        return next(iter(self.directions.values())).shape[0]

    def norms(self) -> dict[str, float]:
        return {hook: float(t.double().norm()) for hook, t in self.directions.items()}  # finite: see MAX_NORM

    def at(self, hook_layers: Mapping[str, int]) -> dict[int, torch.Tensor]:
        """{layer: direction} for the steering layers at its hooks; KeyError naming the hooks no layer steers."""
        missing = [hook for hook in self.directions if hook not in hook_layers]
        if missing:
            raise KeyError(", ".join(missing))
        return {hook_layers[hook]: t for hook, t in self.directions.items()}

    # ---- serialised forms ---------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return save(dict(self.directions), metadata={"format": FORMAT, "id": self.id})

    @classmethod
    def from_bytes(cls, data: bytes, expect_id: str | None = None) -> Vector:
        try:
            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise VectorError(f"not a readable vector file ({e})") from None
        return cls._checked(tensors, expect_id)

    def payload(self) -> dict[str, str]:
        """{hook: base64 of the float32 little-endian bytes}: JSON-safe, for vLLM's `extra_args`."""
        return {h: base64.b64encode(t.numpy().astype("<f4").tobytes()).decode() for h, t in self.directions.items()}

    @classmethod
    def from_payload(cls, expect_id: str, payload) -> Vector:
        if not isinstance(payload, dict):
            raise VectorError(f"vector {expect_id}: the payload is not an object of directions")
        tensors = {}
        for hook, text in payload.items():
            try:
                raw = base64.b64decode(text, validate=True)
            except (TypeError, ValueError):
                raise VectorError(f"vector {expect_id}: {hook} is not base64 text") from None
            if len(raw) % 4:
                raise VectorError(f"vector {expect_id}: {hook} is not whole float32 numbers")
            tensors[hook] = torch.frombuffer(bytearray(raw), dtype=torch.float32)
        return cls._checked(tensors, expect_id)

    @classmethod
    def _checked(cls, tensors, expect_id: str | None) -> Vector:
        v = cls.make(tensors)
        if expect_id is not None and v.id != expect_id:
            raise VectorError(f"the content hashes to {v.id}, not to the expected {expect_id}")
        return v


def encode_payloads(vectors: list[Vector]) -> str:
    """The `extra_args` text carrying these vectors: {id: {hook: base64}} as JSON."""
    return json.dumps({v.id: v.payload() for v in vectors}, separators=(",", ":"))


def decode_payloads(text) -> dict[str, Vector]:
    """`encode_payloads`' text -> {id: Vector}, every id checked against its content; VectorError if anything is off."""
    try:
        raw = json.loads(text) if isinstance(text, str) else text
    except ValueError as e:
        raise VectorError(f"the vector payload is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise VectorError("the vector payload is not an object of vectors")
    return {vid: Vector.from_payload(vid, p) for vid, p in raw.items()}
