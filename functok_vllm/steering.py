"""A steering object as users write it, in one place: parsed, checked against the loaded SAEs, under one set of limits.

Both HTTP edges (functok's server, and stock `vllm serve` through the plugin's admission hook) and both engines use
this module: it sits above the core (it builds `core.spec.SteeringSpec`) and below the server (no HTTP here; a bad
object is a `SpecError` naming the field, which each edge turns into its own 400). The user-facing object:

    {"edits": [{"layer": 2, "feature": 1493, "strength": 8.0, "mode": "add"},
               {"layer": 1, "feature": 77, "value": 0.0, "mode": "clamp"}],
     "positions": "last_function"}

`SteeringLimits` holds every limit on steering (edits, clamp columns, strength); `SteeringInfo` what the engine has
loaded (an SAE per layer, the function tokens), which `check_steering` checks a spec against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from functok_vllm.core.spec import MAX_ABS_STRENGTH, MODES, POSITIONS, SpecError, SteeringSpec
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


class SteeringIn(Strict):
    edits: list[EditIn] = []
    positions: Literal[POSITIONS] = "function"


@dataclass
class SteeringInfo:
    """What steering an engine can apply: an SAE per layer, and the function-token set."""

    d_sae: dict[int, int]  # layer -> SAE width
    clamp_ok: dict[int, bool]  # layer -> False where one feature's activation is not computable alone (TopK)
    sae: dict[int, dict]  # layer -> {"architecture", "hook_name", "site", "d_in", "normalize_activations"}
    function_token_ids: list[int]
    function_token_strings: list[str]

    @classmethod
    def build(cls, configs: dict, function_tokens) -> SteeringInfo:
        """From {layer: SAEConfig} and a FunctionTokens (or None)."""
        ft = function_tokens
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
        )


def parse_steering(given, param: str, limits: SteeringLimits) -> SteeringSpec | None:
    """A user's steering object (a dict, or its JSON text) -> SteeringSpec; None when it has no edits.
    SpecError whose field starts with `param` (e.g. `steering.edits[1].feature`) when it is bad."""
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
            v = getattr(e, name)
            if v is not None and abs(v) > limits.max_abs_strength:
                raise SpecError(f"{param}.edits[{i}].{name}", f"{v!r} exceeds the limit of {limits.max_abs_strength:g}")
    if not s.edits:
        return None
    try:
        return SteeringSpec.from_dict(s.model_dump(exclude_none=True))
    except SpecError as e:
        raise SpecError(f"{param}.{e.field}", e.message) from None


def check_steering(spec: SteeringSpec, info: SteeringInfo, limits: SteeringLimits, param: str = "steering") -> None:
    """SpecError unless the spec fits what is loaded: every edit names a layer with an SAE, a feature inside it, and a
    mode that SAE supports; the edits are within `limits`."""
    if len(spec.edits) > limits.max_edits:
        raise SpecError(f"{param}.edits", f"{len(spec.edits)} edits; at most {limits.max_edits} are allowed")
    for i, e in enumerate(spec.edits):
        where = f"{param}.edits[{i}]"
        if e.layer not in info.d_sae:
            have = ", ".join(map(str, sorted(info.d_sae))) or "none"
            raise SpecError(f"{where}.layer", f"no SAE is loaded at layer {e.layer} (layers with SAEs: {have})")
        if not 0 <= e.feature < info.d_sae[e.layer]:
            raise SpecError(
                f"{where}.feature", f"{e.feature} is outside [0, {info.d_sae[e.layer]}) for the SAE at layer {e.layer}"
            )
        if e.mode != "add" and not info.clamp_ok[e.layer]:
            arch = info.sae[e.layer]["architecture"]
            raise SpecError(
                f"{where}.mode",
                f"{e.mode} needs one feature's activation; the SAE at layer {e.layer} is {arch}, whose activations "
                "depend on every feature",
            )
        for name in ("strength", "value"):
            v = getattr(e, name)
            if abs(v) > limits.max_abs_strength:
                raise SpecError(f"{where}.{name}", f"{v!r} exceeds the limit of {limits.max_abs_strength:g}")


def api_form(spec: SteeringSpec) -> dict:
    """A spec as a request's steering object (without the field its mode does not use), so it can be sent back."""
    used = {"add": ("strength",), "clamp": ("value",), "ablate": ()}
    edits = [
        {"layer": e.layer, "feature": e.feature, "mode": e.mode} | {k: getattr(e, k) for k in used[e.mode]}
        for e in spec.edits
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
    if not isinstance(obj, dict):
        raise SpecError(param, f"must be a JSON object, got {shown(obj)}")
    return obj
