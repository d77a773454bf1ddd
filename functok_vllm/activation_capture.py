"""The `capture` object of a generation request (raw residual activations), its binary answer, and a reader for it.

    "capture": {"layers": [1, 2], "positions": "all", "dtype": "float32", "edits": "after"}

asks for the residual stream at the hook point of each listed steering layer (an SAE's hook, or `resid_post` of an
add-only `--steer-layers` layer), after this request's edits there (`edits: "after"`, the default: what the SAE reads
when the request is steered) or before them (`"before"`: edits upstream applied, this layer's not), at every
position the request's forwards compute: the prompt, then each generated token that is fed back (the last
generated token is never forwarded, so it has no activation). `positions` keeps

- `all`: every such position;
- `last`: the last of them (with max_tokens 0: the last prompt token);
- `function`: the positions holding a function token (the paper's positions);
- `last_function`: the last position holding a function token (none: an empty capture).

The answer is one safetensors blob, base64 in the response's choice (`capture.data`): a tensor per layer named by its
canonical hook (`blocks.1.hook_resid_post`, as `GET /v1/steering` names it), (positions, d_model) in `dtype`;
`positions` (int64, index in prompt + completion) and `token_ids` (int64, the token at each). `read_capture` turns it
back into tensors. Every problem is a SpecError naming the field (`capture.layers[1]`), which the HTTP edge turns
into a 400.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load, save

from functok_vllm.core.spec import SpecError
from functok_vllm.steering import SteeringInfo, Strict, StrictInt
from functok_vllm.validation import shown, validated

CAPTURE_POSITIONS = ("all", "last", "function", "last_function")
CAPTURE_EDITS = ("after", "before")
CAPTURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMAT = "functok.capture.v1"


@dataclass(frozen=True)
class CaptureRequest:
    layers: tuple[int, ...]  # steering layers (the `layer` an edit names), in the order given
    positions: str = "all"
    dtype: str = "float32"
    edits: str = "after"  # read the stream after this request's edits at the layer, or before them

    def to_dict(self) -> dict:
        """The form an engine passes along (vLLM's `extra_args` carry plain data)."""
        return {"layers": list(self.layers), "positions": self.positions, "dtype": self.dtype, "edits": self.edits}

    @classmethod
    def from_dict(cls, d: dict) -> CaptureRequest:
        return cls(tuple(int(x) for x in d["layers"]), str(d["positions"]), str(d["dtype"]), str(d["edits"]))

    def max_rows(self, forwarded: int) -> int:
        """Positions the capture may hold when `forwarded` positions are computed."""
        return forwarded if self.positions in ("all", "function") else 1

    def max_bytes(self, forwarded: int, d_model: int) -> int:
        """Largest tensor bytes of the answer for `forwarded` positions: what `max_capture_bytes` counts."""
        item = CAPTURE_DTYPES[self.dtype].itemsize
        return self.max_rows(forwarded) * len(self.layers) * d_model * item


MAX_LAYERS = 256  # more than any model's steering layers: bounds the checks' work


class CaptureIn(Strict):
    layers: list[StrictInt] = Field(min_length=1, max_length=MAX_LAYERS)
    positions: str = "all"
    dtype: str = "float32"
    edits: str = "after"


def parse_capture(given, info: SteeringInfo, param: str = "capture") -> CaptureRequest | None:
    """A user's capture object -> CaptureRequest checked against the server's steering layers; None for None."""
    if given is None:
        return None
    c = validated(CaptureIn, given, param)
    if c.positions not in CAPTURE_POSITIONS:
        raise SpecError(f"{param}.positions", f"{shown(c.positions)} is not one of {', '.join(CAPTURE_POSITIONS)}")
    if c.dtype not in CAPTURE_DTYPES:
        raise SpecError(f"{param}.dtype", f"{shown(c.dtype)} is not one of {', '.join(CAPTURE_DTYPES)}")
    if c.edits not in CAPTURE_EDITS:
        raise SpecError(f"{param}.edits", f"{shown(c.edits)} is not one of {', '.join(CAPTURE_EDITS)}")
    req = CaptureRequest(tuple(c.layers), c.positions, c.dtype, c.edits)
    check_capture(req, info, param)
    return req


def check_capture(req: CaptureRequest, info: SteeringInfo, param: str = "capture") -> None:
    """SpecError unless every layer is a steering layer (listed once) and function positions have function tokens."""
    have = sorted(info.hook_layers.values())
    for i, layer in enumerate(req.layers):
        if layer not in have:
            msg = f"layer {layer} has no hook here (steering layers: {', '.join(map(str, have)) or 'none'})"
            raise SpecError(f"{param}.layers[{i}]", msg)
        if layer in req.layers[:i]:
            raise SpecError(f"{param}.layers[{i}]", f"layer {layer} is listed twice")
    if "function" in req.positions and not info.function_token_ids:
        raise SpecError(f"{param}.positions", "this server has no function-token list")


def select_rows(req: CaptureRequest, token_ids: torch.Tensor, fn_mask: torch.Tensor | None) -> torch.Tensor:
    """(rows,) indices into the `token_ids` (positions,) whose activations the capture keeps."""
    n = token_ids.shape[0]
    if req.positions == "all":
        return torch.arange(n)
    if req.positions == "last":
        return torch.arange(n - 1, n)
    hits = fn_mask[token_ids.to(fn_mask.device)].nonzero()[:, 0].cpu()  # (function positions,)
    return hits if req.positions == "function" else hits[-1:]


def encode_capture(
    tensors: dict[str, torch.Tensor], positions: torch.Tensor, token_ids: torch.Tensor, dtype: str
) -> bytes:
    """The safetensors blob: each hook's (rows, d_model) tensor in `dtype`, the `positions` (rows,) they were read
    at and the `token_ids` (rows,) there (int64)."""
    out = {hook: t.to("cpu", CAPTURE_DTYPES[dtype]).contiguous() for hook, t in tensors.items()}
    out["positions"] = positions.to("cpu", torch.int64).contiguous()
    out["token_ids"] = token_ids.to("cpu", torch.int64).contiguous()
    return save(out, metadata={"format": FORMAT})


def read_capture(data) -> dict[str, torch.Tensor]:
    """A response's capture (the choice's `capture` object, its base64 `data`, or the raw bytes) -> {name: tensor}:
    `blocks.L.hook_...` (positions, d_model), `positions` and `token_ids` (positions,). ValueError when unreadable."""
    if isinstance(data, dict):
        data = data["data"]
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise ValueError(f"capture: not base64 ({e})") from None
    try:
        return load(bytes(data))
    except SafetensorError as e:
        raise ValueError(f"capture: not a safetensors blob ({e})") from None
