"""The steering library over HTTP: `/v1/steering/vectors` and `/v1/steering/presets` (list, get, create, replace,
delete), and the lookups a request's `steering` uses (vector names, preset names). Only `functok serve` has these
routes; stock `vllm serve` reads the same data directory to resolve names (`additional_config.functok.library`).

Reads need the user key, changes the admin key (`middleware.Gate`). A request's vector names are resolved once, when
it arrives, to the vectors' current content (`parse_steering`): changing or deleting a vector later never changes
a request already admitted. Presets from the `--config` file are read-only here; presets created over the API are
stored in the library, as given (a vector they name is looked up each time the preset is used).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from functok_vllm.core.spec import SpecError
from functok_vllm.core.vector import VectorError
from functok_vllm.engines.base import Engine
from functok_vllm.library.store import BadName, Conflict, Library, LimitReached, NotFound, NotJSON, vector_names
from functok_vllm.server.config import Limits
from functok_vllm.server.finite import FiniteJSONResponse
from functok_vllm.server.openai_errors import APIError, from_validation
from functok_vllm.server.vector_input import DESCRIPTION_MAX, VectorIn, vector_from_request
from functok_vllm.steering import SteeringContext, SteeringInfo, SteeringLimits, SteeringSpec, Strict, parse_steering
from functok_vllm.validation import shown


class PresetIn(Strict):
    name: str | None = None
    steering: dict[str, Any]
    description: str = Field("", max_length=DESCRIPTION_MAX)


class PresetBook(Mapping):
    """Every preset by name, from the config file (read-only) and the library: `book[name]` is its spec resolved now
    (APIError 400 when it cannot be applied now, e.g. a vector it names is no longer steerable)."""

    def __init__(self, config: dict[str, dict], library: Library, ctx: SteeringContext):
        self.config, self.library, self.ctx = config, library, ctx

    def steering_object(self, name: str) -> dict:
        if name in self.config:
            return self.config[name]
        return self.library.preset_record(name)["steering"]

    def spec(self, name: str, obj: dict, param: str) -> SteeringSpec:
        """A preset's steering object as a spec, checked; SpecError naming `param` when it is bad."""
        spec = parse_steering(obj, param, self.ctx)
        if spec is None:
            raise SpecError(param, "a preset needs at least one edit")
        return spec

    def __getitem__(self, name: str) -> SteeringSpec:
        try:
            obj = self.steering_object(name)
        except NotFound:
            raise KeyError(name) from None
        try:
            return self.spec(name, obj, f"presets.{name}")
        except SpecError as e:
            msg = f"steering: preset {name!r} cannot be applied now: {e.field}: {e.message}"
            raise APIError(400, msg, "steering", "preset_unusable") from None

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and (name in self.config or name in self.library.presets())

    def __iter__(self):
        return iter(sorted(set(self.config) | set(self.library.presets())))

    def objects(self) -> dict[str, dict]:
        """{name: steering object} of every preset, from one reading of the library (consistent under writes)."""
        stored = {name: rec["steering"] for name, rec in self.library.presets().items()}
        return dict(sorted((stored | self.config).items()))

    def cards(self) -> list[dict]:
        """Every preset's card, from one reading of the library (a preset deleted meanwhile is simply absent)."""
        stored = self.library.presets()
        return [self._card(n, stored.get(n)) for n in sorted(set(self.config) | set(stored))]

    def __len__(self) -> int:
        return len(set(self.config) | set(self.library.presets()))

    def card(self, name: str) -> dict:
        return self._card(name, None if name in self.config else self.library.preset_record(name))

    def _card(self, name: str, rec: dict | None) -> dict:
        if name in self.config:
            return {"object": "steering.preset", "name": name, "steering": self.config[name], "source": "config"}
        times = {k: int(rec[k]) for k in ("created", "updated")}
        return {"object": "steering.preset", "name": name, "steering": rec["steering"], "source": "api"} | {
            "description": rec["description"],
            **times,
        }


def vector_card(name: str, rec: dict, info: SteeringInfo) -> dict:
    layers = [{"layer": info.hook_layers.get(h), "hook": h, "norm": rec["norms"][h]} for h in rec["hooks"]]
    return {
        "object": "steering.vector",
        "name": name,
        "version": rec["version"],
        "d_model": rec["d_model"],
        "layers": layers,
        "steerable": all(x["layer"] is not None for x in layers),
        "source": rec["source"],
        "description": rec["description"],
        "created": int(rec["created"]),
        "updated": int(rec["updated"]),
    }


def body_schema(model, upload: bool = False) -> dict:
    """`openapi_extra` declaring a route's JSON body (and the multipart upload) in the schema, which routes that read
    the request themselves lack (nested models inlined: their `$defs` would not resolve inside the OpenAPI file)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            return (
                inline(defs[ref.rsplit("/", 1)[1]])
                if ref.startswith("#/$defs/")
                else {k: inline(v) for k, v in node.items()}
            )
        return [inline(x) for x in node] if isinstance(node, list) else node

    content = {"application/json": {"schema": inline(schema)}}
    if upload:
        fields = {"name": {"type": "string"}, "layers": {"type": "string"}, "description": {"type": "string"}}
        form = {
            "type": "object",
            "required": ["file"],
            "properties": fields | {"file": {"type": "string", "format": "binary"}},
        }
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": True, "content": content}}


def add_library_routes(
    app: FastAPI,
    library: Library,
    book: PresetBook,
    info: SteeringInfo,
    limits: SteeringLimits,
    engine: Engine,
    server_limits: Limits,
):
    def lookup(fn, *args):
        try:
            return fn(*args)
        except NotFound as e:
            raise APIError(404, str(e), "name", "not_found") from None

    async def change(fn, *args):
        """A write to the store, off the event loop (it fsyncs), with its refusals as HTTP errors."""
        try:
            return await asyncio.to_thread(fn, *args)
        except NotFound as e:
            raise APIError(404, str(e), "name", "not_found") from None
        except BadName as e:
            raise APIError(400, f"name: {e}", "name", "invalid_name") from None
        except Conflict as e:
            raise APIError(409, str(e), "name", "conflict") from None
        except LimitReached as e:
            raise APIError(409, str(e), None, "limit_reached") from None
        except VectorError as e:
            raise APIError(400, str(e), "directions") from None
        except NotJSON as e:
            raise APIError(400, str(e), None, "invalid_value") from None

    def named(given: str | None, path_name: str | None) -> str:
        if path_name is not None and given is not None and given != path_name:
            raise APIError(400, f"name: {shown(given)} differs from the name in the path ({path_name!r})", "name")
        name = path_name or given
        if name is None:
            raise APIError(400, "name: this field is required", "name")
        return name

    # ---- vectors ------------------------------------------------------------------------------------------------

    @app.get("/v1/steering/vectors")
    async def list_vectors():
        data = [vector_card(n, rec, info) for n, rec in sorted(library.vectors().items())]
        return {"object": "list", "data": data}

    @app.get("/v1/steering/vectors/{name}")
    async def get_vector(name: str):
        rec = lookup(library.vector_record, name)
        vector = await asyncio.to_thread(library.content, rec["version"])
        directions = {str(info.hook_layers.get(h, h)): t.tolist() for h, t in vector.directions.items()}
        return vector_card(name, rec, info) | {"directions": directions}

    async def put_vector(request: Request, path_name: str | None) -> JSONResponse:
        given, vector, source, description = await vector_from_request(request, info, limits, engine, server_limits)
        name = named(given, path_name)
        rec, new = await change(library.put_vector, name, vector, source, description, path_name is not None)
        return FiniteJSONResponse(vector_card(name, rec, info), status_code=201 if new else 200)

    @app.post("/v1/steering/vectors", status_code=201, openapi_extra=body_schema(VectorIn, upload=True))
    async def create_vector(request: Request):
        """JSON {"name", "layer", "features": [{"feature", "strength"}]}, {"name", "directions": {"L": [...]}} or
        {"name", "examples": {"positive", "negative", "layers", "position", "method", "paired"}} (computed on this
        engine, `engines.contrast`), or multipart/form-data with `name`, `file` (GGUF control vector or
        safetensors), `layers`, `description`."""
        return await put_vector(request, None)

    @app.put("/v1/steering/vectors/{name}", openapi_extra=body_schema(VectorIn, upload=True))
    async def replace_vector(name: str, request: Request):
        """Create or replace: the same bodies as POST (the name from the path)."""
        return await put_vector(request, name)

    @app.delete("/v1/steering/vectors/{name}")
    async def delete_vector(name: str):
        users = {p for p, obj in book.config.items() if name in vector_names(obj)}
        rec = await change(library.delete_vector, name, users)
        return {"object": "steering.vector", "name": name, "version": rec["version"], "deleted": True}

    # ---- presets ------------------------------------------------------------------------------------------------

    @app.get("/v1/steering/presets")
    async def list_presets():
        return {"object": "list", "data": book.cards()}

    @app.get("/v1/steering/presets/{name}")
    async def get_preset(name: str):
        return lookup(book.card, name)

    async def put_preset(request: Request, path_name: str | None) -> JSONResponse:
        try:
            body = PresetIn.model_validate_json(await request.body())
        except ValidationError as e:
            raise from_validation(list(e.errors())) from None
        name = named(body.name, path_name)
        if name in book.config:
            raise APIError(409, f"preset {name!r} is defined by the --config file; edit the file", "name", "conflict")
        try:
            book.spec(name, body.steering, "steering")  # applicable now: its layers, features and vectors exist
        except SpecError as e:
            raise APIError(400, f"{e.field}: {e.message}", e.field) from None
        rec, new = await change(library.put_preset, name, body.steering, body.description, path_name is not None)
        return FiniteJSONResponse(book.card(name), status_code=201 if new else 200)

    @app.post("/v1/steering/presets", status_code=201, openapi_extra=body_schema(PresetIn))
    async def create_preset(request: Request):
        """{"name", "steering": a steering object (it may name vectors), "description"}."""
        return await put_preset(request, None)

    @app.put("/v1/steering/presets/{name}", openapi_extra=body_schema(PresetIn))
    async def replace_preset(name: str, request: Request):
        return await put_preset(request, name)

    @app.delete("/v1/steering/presets/{name}")
    async def delete_preset(name: str):
        if name in book.config:
            raise APIError(409, f"preset {name!r} is defined by the --config file; edit the file", "name", "conflict")
        await change(library.delete_preset, name)
        return {"object": "steering.preset", "name": name, "deleted": True}
