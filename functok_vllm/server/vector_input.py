"""What a request to create or replace a steering vector carries, turned into a `core.vector.Vector`: SAE features at a
layer, raw directions per layer (JSON), or an uploaded file (multipart: a llama.cpp control-vector GGUF or
safetensors, `library.files`). Every problem is an APIError 400 naming the field and what is wrong.

Layer numbers are the server's (`GET /v1/steering`): an SAE's layer, or an add-only layer of `--steer-layers`. A
direction is stored at that layer's hook point, so it is applied exactly where an edit at that layer is.

A vector from features is `sum_i strength_i * W_dec[feature_i]`, summed in float32 in the order given: the numbers
the engine adds for the same features given as inline `add` edits (bit for bit on a float32 model).

Parsing a body (JSON of up to --max-vector-bytes, a GGUF or safetensors file) runs in a worker thread, PARSERS at a
time, so the event loop keeps answering; its work is bounded by the bytes present (`library.files`), and a parse that
still passes PARSE_BUDGET_S is answered 413 (the thread finishes its bounded work and is dropped).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import weakref

import torch
from fastapi import Request
from pydantic import Field, ValidationError, model_validator
from starlette.datastructures import UploadFile

from functok_vllm.activation_capture import MAX_LAYERS, CaptureRequest, check_capture
from functok_vllm.core.hookpoint import parse_hook_name
from functok_vllm.core.sae import SAELoadError, decoder_rows
from functok_vllm.core.spec import SpecError
from functok_vllm.core.vector import Vector, VectorError
from functok_vllm.engines.base import Engine, EngineFull, EngineStopped, RequestError
from functok_vllm.engines.contrast import METHODS, READ_POSITIONS, Examples, contrast_vector
from functok_vllm.library.files import FileError, read_vector_file
from functok_vllm.server.config import Limits
from functok_vllm.server.openai_errors import APIError, from_validation
from functok_vllm.steering import SteeringInfo, SteeringLimits, Strict, StrictFloat, StrictInt, check_feature
from functok_vllm.validation import shown

log = logging.getLogger("functok.server")
MAX_FEATURES = 1024  # features summed into one vector
DESCRIPTION_MAX = 1000
CHARS_PER_TOKEN = 32  # a prompt longer than this many characters per allowed token is refused untokenized
PARSERS = 2  # uploads parsed at once (the admin's; every other request keeps the event loop and the other core)
PARSE_BUDGET_S = 10.0  # a backstop: a 16 MiB file within the scan's bounds parses in well under a second
_parsing: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its Semaphore(PARSERS)


class FeatureIn(Strict):
    feature: StrictInt
    strength: StrictFloat


class ExamplesIn(Strict):
    """Contrastive examples (`engines.contrast`): prompts as text, the layers and the read position."""

    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(min_length=1)
    layers: list[StrictInt] = Field(min_length=1, max_length=MAX_LAYERS)
    position: str = "last_function"
    method: str = "mean_diff"
    paired: bool = True


class VectorIn(Strict):
    """JSON body: `name` (POST; PUT takes it from the path), then `layer` + `features`, `directions` or
    `examples`."""

    name: str | None = None
    layer: StrictInt | None = None
    features: list[FeatureIn] | None = Field(None, min_length=1, max_length=MAX_FEATURES)
    directions: dict[str, list[StrictFloat]] | None = Field(None, min_length=1)
    examples: ExamplesIn | None = None
    description: str = Field("", max_length=DESCRIPTION_MAX)

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.features, self.directions, self.examples)) != 1:
            raise ValueError("give either 'layer' and 'features', 'directions' or 'examples' (one of them)")
        if self.features is not None and self.layer is None:
            raise ValueError("'features' needs the 'layer' of their SAE")
        if self.directions is not None and self.layer is not None:
            raise ValueError("'directions' are keyed by layer; 'layer' goes with 'features'")
        return self


async def vector_from_request(
    request: Request, info: SteeringInfo, limits: SteeringLimits, engine: Engine, server_limits: Limits
) -> tuple[str | None, Vector, dict, str]:
    """(name or None, vector, source, description) from a JSON body or a multipart upload; vectors from examples
    are computed on `engine` (unsteered requests of its batch)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _from_upload(request, info)
    body = await off_loop(_parse_json, await request.body())
    if body.examples is not None:
        vector, source = await from_examples(body.examples, engine, info, server_limits)
        return body.name, vector, source, body.description
    return await off_loop(_from_json, body, info, limits)


async def off_loop(fn, *args):
    """fn(*args) in a worker thread, at most PARSERS at once, within PARSE_BUDGET_S (413 past it)."""
    t0 = time.monotonic()
    async with _parsing.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(PARSERS)):
        left = PARSE_BUDGET_S - (time.monotonic() - t0)
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), max(left, 0.001))
        except asyncio.TimeoutError:
            msg = f"the body could not be parsed within {PARSE_BUDGET_S:g} s; send a smaller or simpler one"
            raise APIError(413, msg, "file", "parse_budget_exceeded") from None


def _parse_json(text: bytes) -> VectorIn:
    try:
        return VectorIn.model_validate_json(text)
    except ValidationError as e:
        raise from_validation(list(e.errors())) from None


def _from_json(body: VectorIn, info: SteeringInfo, limits: SteeringLimits) -> tuple[str | None, Vector, dict, str]:
    vector, source = from_features(body, info, limits) if body.features else from_directions(body.directions, info)
    return body.name, vector, source, body.description


def from_features(body: VectorIn, info: SteeringInfo, limits: SteeringLimits) -> tuple[Vector, dict]:
    layer = body.layer
    try:
        for i, f in enumerate(body.features):
            check_feature(info, limits, layer, f.feature, {"strength": f.strength}, f"features[{i}]", "layer")
    except SpecError as e:
        raise APIError(400, str(e), e.field) from None
    try:
        rows = decoder_rows(info.sae_paths[layer], [f.feature for f in body.features])  # (n, d_model) float32
    except SAELoadError as e:
        raise APIError(500, f"the SAE at layer {layer} cannot be read: {e}", code="sae_unreadable") from None
    direction = torch.zeros(rows.shape[1], dtype=torch.float32)
    for f, row in zip(body.features, rows, strict=True):
        direction += f.strength * row  # as `SteeringTable._write` adds an inline edit
    source = {"kind": "features", "layer": layer, "features": [f.model_dump() for f in body.features]}
    return _make({_hook_of(info, layer): direction}), source


def examples_of(given: ExamplesIn, engine: Engine, info: SteeringInfo, limits: Limits) -> Examples:
    """The examples checked and tokenized: APIError 400 naming the field (`examples.negative[2]`) when bad."""
    where = "examples"
    n = len(given.positive) + len(given.negative)
    if n > limits.max_example_prompts:
        msg = f"{n} prompts; this server takes at most {limits.max_example_prompts} (max_example_prompts)"
        raise APIError(400, f"{where}: {msg}", where)
    if given.paired and len(given.positive) != len(given.negative):
        msg = (
            f"paired examples need as many negatives as positives, got {len(given.positive)} and {len(given.negative)}"
        )
        raise APIError(400, f"{where}.negative: {msg}", f"{where}.negative")
    if given.position not in READ_POSITIONS:
        msg = f"{shown(given.position)} is not one of {', '.join(READ_POSITIONS)}"
        raise APIError(400, f"{where}.position: {msg}", f"{where}.position")
    if given.method not in METHODS:
        raise APIError(
            400, f"{where}.method: {shown(given.method)} is not one of {', '.join(METHODS)}", f"{where}.method"
        )
    if given.method == "pca" and not (given.paired and len(given.positive) >= 2):
        msg = "'pca' takes the differences of pairs: paired examples, two pairs at least"
        raise APIError(400, f"{where}.method: {msg}", f"{where}.method")
    try:
        cap = CaptureRequest(tuple(given.layers), READ_POSITIONS[given.position])
        check_capture(cap, info, f"{where}")
    except SpecError as e:
        raise APIError(400, f"{e.field}: {e.message}", e.field) from None
    ids = {}
    for side in ("positive", "negative"):
        ids[side] = []
        for i, text in enumerate(getattr(given, side)):
            field = f"{where}.{side}[{i}]"
            cap_tokens = min(limits.max_example_tokens, engine.max_model_len - 1)
            if len(text) > CHARS_PER_TOKEN * cap_tokens:  # before tokenizing it on the event loop
                msg = f"{len(text)} characters; at most {CHARS_PER_TOKEN * cap_tokens} ({cap_tokens} tokens)"
                raise APIError(400, f"{field}: {msg}", field)
            try:
                toks = engine.encode(text)
            except Exception as e:  # the tokenizer's errors (e.g. a lone surrogate)
                raise APIError(400, f"{field}: the tokenizer cannot encode it ({type(e).__name__})", field) from None
            if not toks:
                raise APIError(400, f"{field}: the prompt is empty", field)
            if len(toks) > cap_tokens:
                msg = f"{len(toks)} tokens; at most {cap_tokens} (max_example_tokens, the context)"
                raise APIError(400, f"{field}: {msg}", field)
            ids[side].append(toks)
    return Examples(ids["positive"], ids["negative"], tuple(given.layers), given.position, given.method, given.paired)


async def from_examples(given: ExamplesIn, engine: Engine, info: SteeringInfo, limits: Limits) -> tuple[Vector, dict]:
    ex = examples_of(given, engine, info, limits)
    t0 = time.monotonic()
    try:
        directions = await contrast_vector(engine, ex)
    except RequestError as e:
        raise APIError(400, str(e), e.param, e.code) from None
    except EngineFull as e:
        raise APIError(429, str(e), code="server_full", headers={"Retry-After": str(e.retry_after)}) from None
    except EngineStopped as e:
        raise APIError(503, str(e), code="engine_stopped") from None
    log.info("vector from %d examples computed in %.2f s", len(ex.positive) + len(ex.negative), time.monotonic() - t0)
    prompts = json.dumps({"positive": given.positive, "negative": given.negative})  # ASCII: any code point hashes
    source = {
        "kind": "examples",
        "method": ex.method,
        "position": ex.position,
        "layers": list(ex.layers),
        "paired": ex.paired,
        "positives": len(ex.positive),
        "negatives": len(ex.negative),
        "prompts_sha256": hashlib.sha256(prompts.encode()).hexdigest(),
        "model": engine.model_name,
    }
    return _make({_hook_of(info, layer): d for layer, d in directions.items()}), source


def from_directions(given: dict[str, list[float]], info: SteeringInfo) -> tuple[Vector, dict]:
    directions = {}
    for key, values in given.items():
        where = f"directions.{key}"
        try:
            layer = int(key)
        except ValueError:
            raise APIError(400, f"{where}: keys are layer numbers, got {shown(key)}", where) from None
        if layer not in info.hook_layers.values():
            raise APIError(400, f"{where}: layer {layer} is not steerable here; {info.describe_layers()}", where)
        if len(values) != info.d_model:
            msg = f"{len(values)} values; this model's d_model is {info.d_model}"
            raise APIError(400, f"{where}: {msg}", where)
        directions[_hook_of(info, layer)] = torch.tensor(values, dtype=torch.float32)
    return _make(directions), {"kind": "directions", "layers": sorted(int(k) for k in given)}


async def _from_upload(request: Request, info: SteeringInfo) -> tuple[str | None, Vector, dict, str]:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as e:  # python-multipart's and starlette's errors for a malformed body
        raise APIError(400, f"the multipart body cannot be read ({e})", "file") from None
    unknown = sorted(set(form) - {"name", "file", "layers", "description"})
    if unknown:
        raise APIError(400, f"{unknown[0]}: unknown form field (fields: name, file, layers, description)", unknown[0])
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "file: the upload needs a 'file' part (a GGUF control vector or safetensors)", "file")
    directions, meta = await off_loop(_read_file, await upload.read(), info.d_model)
    directions = _pick_layers(directions, form.get("layers"), info)
    source = {"kind": meta.pop("format"), "filename": upload.filename, **{k: v for k, v in meta.items() if v}}
    source["layers"] = sorted(info.hook_layers[h] for h in directions)
    description = form.get("description") or ""
    if not isinstance(description, str) or len(description) > DESCRIPTION_MAX:
        raise APIError(400, f"description: at most {DESCRIPTION_MAX} characters of text", "description")
    name = form.get("name")
    return (name if isinstance(name, str) else None), _make(directions), source, description


def _read_file(data: bytes, d_model: int) -> tuple[dict, dict]:
    try:
        return read_vector_file(data, d_model)
    except FileError as e:
        raise APIError(400, f"file: {e}", "file") from None


def _pick_layers(directions: dict, layers, info: SteeringInfo) -> dict:
    """The file's directions at the steerable layers `layers` ("1,3": the form field), or all of them, which must
    then all be steerable."""
    if layers is None or layers == "":
        outside = [h for h in directions if h not in info.hook_layers]
        if outside:
            msg = (
                f"file: the file has directions at {_file_layers(outside)}, where this server does not steer; "
                f"{info.describe_layers()}. Keep some with the form field 'layers' (e.g. layers=1,3), or start the "
                "server with --steer-layers"
            )
            raise APIError(400, msg, "file")
        return directions
    try:
        wanted = sorted({int(x) for x in str(layers).split(",")})
    except ValueError:
        raise APIError(400, f"layers: a comma-separated list of layer numbers, got {shown(layers)}", "layers") from None
    out = {}
    for layer in wanted:
        if layer not in info.hook_layers.values():
            raise APIError(400, f"layers: layer {layer} is not steerable here; {info.describe_layers()}", "layers")
        hook = _hook_of(info, layer)
        if hook not in directions:
            msg = f"the file has no direction at layer {layer} ({hook}); it has {_file_layers(list(directions))}"
            raise APIError(400, f"layers: {msg}", "layers")
        out[hook] = directions[hook]
    return out


def _file_layers(hooks: list[str]) -> str:
    """Hooks as a control-vector file names them: `direction.5 (blocks.5.hook_resid_post)`."""

    points = sorted(((parse_hook_name(h), h) for h in hooks), key=lambda ph: (ph[0].layer, ph[1]))
    return ", ".join(f"direction.{p.layer} ({h})" if p.site == "resid_post" else h for p, h in points)


def _hook_of(info: SteeringInfo, layer: int) -> str:
    return next(h for h, n in info.hook_layers.items() if n == layer)


def _make(directions: dict) -> Vector:
    try:
        return Vector.make(directions)
    except VectorError as e:
        raise APIError(400, f"directions: {e}", "directions") from None
