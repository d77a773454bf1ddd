"""A steering object as users write it, in one place: parsed, checked against the loaded SAEs, under one set of limits.

Both HTTP edges (functok's server, and stock `vllm serve` through the plugin's admission hook) and both engines use
this module: it sits above the core (it builds `core.spec.SteeringSpec`) and below the server (no HTTP here; a bad
object is a `SpecError` naming the field, which each edge turns into its own 400). The user-facing object:

    {"edits": [{"layer": 2, "feature": 1493, "strength": 8.0, "mode": "add"},
               {"layer": 1, "feature": 77, "value": 0.0, "mode": "clamp"},
               {"vector": "calm", "strength": 2.0}],
     "positions": "last_function"}

An edit naming a `vector` (a steering vector from the library, `functok_vllm.library`) adds `strength` times it at
each of its layers; it is resolved here, once, to the vector's content (`Vectors.lookup`) and bound to this engine's
layers, so the spec holds the version it started with whatever happens to the name later. `"version"` pins one.

`SteeringLimits` holds every limit on steering (edits, clamp columns, strength); `SteeringInfo` what the engine has
loaded (an SAE per layer, add-only layers, the function tokens), which `check_steering` checks a spec against.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from functok_vllm.core.hookpoint import HookPoint
from functok_vllm.core.spec import MAX_ABS_STRENGTH, MODES, POSITIONS, Edit, SpecError, SteeringSpec, VectorEdit
from functok_vllm.core.vector import Vector
from functok_vllm.validation import describe, shown

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]  # strict floats take JSON ints too, but never strings or bools


def _limit(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class SteeringLimits:
    """Every limit on steering, for both engines and both servers (flags of `functok serve`, keys of vLLM's
    `additional_config["functok"]`)."""

    max_edits: int = _limit(16, "edits per request; more get 400")
    max_clamps: int = _limit(
        64,
        "clamp/ablate columns per layer shared by the running batch (at least max-edits); a request that does "
        "not fit waits",
    )
    max_abs_strength: float = _limit(1000.0, "largest |strength| and |value| of an edit; larger get 400")

    def __post_init__(self):
        for f in ("max_edits", "max_clamps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be a whole number of at least 1, got {v!r}")
        if self.max_clamps < self.max_edits:
            raise ValueError(f"max_clamps ({self.max_clamps}) must be at least max_edits ({self.max_edits})")
        s = self.max_abs_strength
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s <= MAX_ABS_STRENGTH:
            raise ValueError(f"max_abs_strength must be in (0, {MAX_ABS_STRENGTH:g}], got {s!r}")


class Strict(BaseModel):
    """Our own objects forbid unknown keys (a misspelt `strenght` is an error, not a silent no-op) and NaN/Inf."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EditIn(Strict):
    layer: StrictInt
    feature: StrictInt
    mode: Literal[MODES] = "add"
    strength: StrictFloat | None = None  # add: residual += strength * W_dec[feature]
    value: StrictFloat | None = None  # clamp: the feature's activation is set to value; ablate: to 0

    @model_validator(mode="after")
    def _fields_fit_mode(self):
        need = {"add": "strength", "clamp": "value", "ablate": None}[self.mode]
        for name in ("strength", "value"):
            given = getattr(self, name) is not None
            if name == need and not given:
                raise ValueError(f"mode {self.mode!r} needs '{name}'")
            if name != need and given:
                raise ValueError(f"mode {self.mode!r} takes no '{name}'" + (f" (it takes '{need}')" if need else ""))
        return self


VECTOR_NAME_MAX = 64  # a vector's name (the library checks its characters when it is stored)


class VectorEditIn(Strict):
    vector: str = Field(min_length=1, max_length=VECTOR_NAME_MAX)  # a name in the library
    mode: Literal["add"] = "add"
    strength: StrictFloat
    version: str | None = Field(None, min_length=1, max_length=64)  # the content id it must have (else 400)

    @model_validator(mode="before")
    @classmethod
    def _no_feature_fields(cls, data):
        if isinstance(data, dict):
            for name in ("layer", "feature", "value"):
                if name in data:
                    raise ValueError(f"a vector edit takes no '{name}' (the vector says where it adds)")
            if data.get("mode", "add") != "add":
                raise ValueError(f"a vector edit only adds (mode 'add'), not {shown(data['mode'])}")
        return data


def _edit_kind(v) -> str:
    """Which model validates an edit: one naming a `vector`, or one naming an SAE feature."""
    return "VectorEdit" if isinstance(v, VectorEditIn) or (isinstance(v, dict) and "vector" in v) else "FeatureEdit"


AnyEdit = Annotated[
    Annotated[EditIn, Tag("FeatureEdit")] | Annotated[VectorEditIn, Tag("VectorEdit")], Discriminator(_edit_kind)
]


class SteeringIn(Strict):
    edits: list[AnyEdit] = []
    positions: Literal[POSITIONS] = "function"


@dataclass
class SteeringInfo:
    """What steering an engine can apply: an SAE per layer, add-only layers, and the function-token set."""

    d_sae: dict[int, int]  # layer -> SAE width
    clamp_ok: dict[int, bool]  # layer -> False where one feature's activation is not computable alone (TopK)
    sae: dict[int, dict]  # layer -> {"architecture", "hook_name", "site", "d_in", "normalize_activations"}
    function_token_ids: list[int]
    function_token_strings: list[str]
    add_layers: list[int] = field(default_factory=list)  # layers without an SAE where vectors go (resid_post)
    hook_layers: dict[str, int] = field(default_factory=dict)  # canonical hook name -> layer, every steering layer
    d_model: int | None = None
    sae_paths: dict[int, object] = field(default_factory=dict, repr=False)  # layer -> SAE directory (not shown)

    @classmethod
    def build(cls, configs: dict, function_tokens, add_layers=(), d_model: int | None = None) -> SteeringInfo:
        """From {layer: SAEConfig}, a FunctionTokens (or None), the add-only layers and the model's width."""
        ft = function_tokens
        hooks = {c.hook.canonical().name: layer for layer, c in configs.items()}
        hooks |= {HookPoint(layer, "resid_post").name: layer for layer in add_layers}
        d_model = d_model or next((c.d_in for c in configs.values()), None)
        return cls(
            d_sae={layer: c.d_sae for layer, c in configs.items()},
            clamp_ok={layer: c.arch.clamp_exact for layer, c in configs.items()},
            sae={
                layer: {
                    "architecture": c.architecture,
                    "hook_name": c.hook_name,
                    "site": c.site,
                    "d_in": c.d_in,
                    "normalize_activations": c.normalize_activations,
                }
                for layer, c in configs.items()
            },
            function_token_ids=list(ft.ids) if ft else [],
            function_token_strings=list(ft.strings) if ft else [],
            add_layers=sorted(add_layers),
            sae_paths={layer: c.path for layer, c in configs.items()},
            hook_layers=dict(sorted(hooks.items(), key=lambda kv: kv[1])),
            d_model=d_model,
        )

    def describe_layers(self) -> str:
        """The steerable layers in words, for error messages."""
        names = {layer: hook for hook, layer in self.hook_layers.items()}
        parts = [
            f"{layer} ({names[layer]}{', --steer-layers' if layer in self.add_layers else ''})"
            for layer in sorted(names)
        ]
        return "steerable layers: " + (", ".join(parts) or "none")


@dataclass
class Vectors:
    """How a spec's vector edits are resolved: `lookup(name, version)` gives the vector (LookupError saying why not),
    bound to the layers `info` steers."""

    lookup: Callable[[str, str | None], Vector]
    info: SteeringInfo

    def bind(self, name: str, version: str | None, strength: float, where: str) -> VectorEdit:
        try:
            v = self.lookup(name, version)
        except LookupError as e:
            raise SpecError(f"{where}.vector", e.args[0] if e.args else str(e)) from None
        if self.info.d_model is not None and v.d_model != self.info.d_model:
            msg = f"vector {name!r} is {v.d_model} wide; this model's d_model is {self.info.d_model}"
            raise SpecError(f"{where}.vector", msg)
        try:
            at = v.at(self.info.hook_layers)
        except KeyError as e:
            msg = f"vector {name!r} has directions at {e.args[0]}, where this server does not steer; "
            raise SpecError(f"{where}.vector", msg + self.info.describe_layers()) from None
        return VectorEdit(v.id, strength, name, at, v)


def parse_steering(given, param: str, limits: SteeringLimits, vectors: Vectors | None = None) -> SteeringSpec | None:
    """A user's steering object (a dict, or its JSON text) -> SteeringSpec; None when it has no edits. Vector edits
    are resolved through `vectors` (SpecError without it). SpecError whose field starts with `param` (e.g.
    `steering.edits[1].feature`) when it is bad."""
    if isinstance(given, str):
        given = _json_object(given, param)
    if not isinstance(given, dict):
        raise SpecError(param, f"must be a JSON object, got {shown(given)}")
    try:
        s = SteeringIn.model_validate(given)
    except ValidationError as e:
        where, msg = describe(e.errors(), tuple(param.split(".")))
        raise SpecError(where or param, msg) from None
    if len(s.edits) > limits.max_edits:
        raise SpecError(f"{param}.edits", f"{len(s.edits)} edits; at most {limits.max_edits} are allowed")
    for i, e in enumerate(s.edits):
        for name in ("strength", "value"):
            v = getattr(e, name, None)
            if v is not None and abs(v) > limits.max_abs_strength:
                raise SpecError(f"{param}.edits[{i}].{name}", f"{v!r} exceeds the limit of {limits.max_abs_strength:g}")
    if not s.edits:
        return None
    features = [(i, e) for i, e in enumerate(s.edits) if isinstance(e, EditIn)]
    bound = []
    for i, e in enumerate(s.edits):
        if isinstance(e, VectorEditIn):
            if vectors is None:
                raise SpecError(f"{param}.edits[{i}].vector", "this server has no steering vectors")
            bound.append(vectors.bind(e.vector, e.version, e.strength, f"{param}.edits[{i}]"))
    try:
        edits = tuple(Edit(**e.model_dump(exclude_none=True)) for _, e in features)
        return SteeringSpec(edits, s.positions, tuple(bound))
    except SpecError as e:  # its edits[j] counts feature edits only: name the user's index
        field_name = e.field
        if field_name.startswith("edits[") and "]" in field_name:
            j, rest = field_name[6:].split("]", 1)
            field_name = f"edits[{features[int(j)][0]}]{rest}"
        raise SpecError(f"{param}.{field_name}", e.message) from None


def check_steering(spec: SteeringSpec, info: SteeringInfo, limits: SteeringLimits, param: str = "steering") -> None:
    """SpecError unless the spec fits what is loaded: every edit names a layer with an SAE, a feature inside it, and a
    mode that SAE supports; every vector is bound to steering layers; the edits are within `limits`."""
    n = len(spec.edits) + len(spec.vectors)
    if n > limits.max_edits:
        raise SpecError(f"{param}.edits", f"{n} edits; at most {limits.max_edits} are allowed")
    steerable = set(info.hook_layers.values())
    for v in spec.vectors:
        name = v.name or v.vector
        if abs(v.strength) > limits.max_abs_strength:
            raise SpecError(
                f"{param}.edits",
                f"vector {name!r}: strength {v.strength!r} exceeds the limit of {limits.max_abs_strength:g}",
            )
        if not v.at or set(v.at) - steerable:
            raise SpecError(
                f"{param}.edits", f"vector {name!r} is not bound to this server's layers; {info.describe_layers()}"
            )
    for i, e in enumerate(spec.edits):
        where = f"{param}.edits[{i}]"
        check_feature(info, limits, e.layer, e.feature, {"strength": e.strength, "value": e.value}, where)
        if e.mode != "add" and not info.clamp_ok[e.layer]:
            arch = info.sae[e.layer]["architecture"]
            raise SpecError(
                f"{where}.mode",
                f"{e.mode} needs one feature's activation; the SAE at layer {e.layer} is {arch}, whose activations "
                "depend on every feature",
            )


def check_feature(
    info: SteeringInfo, limits: SteeringLimits, layer: int, feature: int, values: dict, where: str, layer_at=None
) -> None:
    """One SAE feature with its strength/value: an SAE at `layer`, the feature inside it, every value within the
    strength limit. SpecError names `{where}.feature` etc.; `layer_at` the layer's field when it is not
    `{where}.layer` (a vector built from features names its layer once)."""
    if layer not in info.d_sae:
        have = ", ".join(map(str, sorted(info.d_sae))) or "none"
        raise SpecError(layer_at or f"{where}.layer", f"no SAE is loaded at layer {layer} (layers with SAEs: {have})")
    if not 0 <= feature < info.d_sae[layer]:
        raise SpecError(
            f"{where}.feature", f"{feature} is outside [0, {info.d_sae[layer]}) for the SAE at layer {layer}"
        )
    for name, v in values.items():
        if abs(v) > limits.max_abs_strength:
            raise SpecError(f"{where}.{name}", f"{v!r} exceeds the limit of {limits.max_abs_strength:g}")


def api_form(spec: SteeringSpec) -> dict:
    """A spec as a request's steering object (without the field its mode does not use), so it can be sent back."""
    used = {"add": ("strength",), "clamp": ("value",), "ablate": ()}
    edits = [
        {"layer": e.layer, "feature": e.feature, "mode": e.mode} | {k: getattr(e, k) for k in used[e.mode]}
        for e in spec.edits
    ]
    edits += [
        {"mode": "add", "vector": v.name or v.vector, "version": v.vector, "strength": v.strength} for v in spec.vectors
    ]
    return {"edits": edits, "positions": spec.positions}


def to_json(spec: SteeringSpec) -> str:
    """The spec as a client sends it in `vllm_xargs.steering` (a JSON string: vLLM's extension field is scalar)."""
    return json.dumps(api_form(spec))


def _json_object(text: str, param: str) -> dict:
    def no_constants(name):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        obj = json.loads(text, parse_constant=no_constants)
    except ValueError as e:
        raise SpecError(param, f"not a valid JSON object ({e})") from None
    except RecursionError:
        raise SpecError(param, "not a valid JSON object (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise SpecError(param, f"must be a JSON object, got {shown(obj)}")
    return obj
