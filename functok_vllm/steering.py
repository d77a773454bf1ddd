"""The steering object, written once: its schema (what users write and what every engine runs), its limits and its
one parser.

A request's `steering` is a `SteeringSpec`: the same pydantic models validate the user's JSON at every edge and are
the objects the engines apply, so no field is written twice. The user-facing object:

    {"edits": [{"layer": 2, "feature": 1493, "strength": 8.0, "mode": "add"},
               {"layer": 1, "feature": 77, "value": 0.0, "mode": "clamp"},
               {"layer": 2, "feature": 12, "mode": "project_out"},
               {"vector": "calm", "strength": 0.5, "strength_unit": "token_norm"},
               {"vector": "refusal", "mode": "cap", "max": 1.5}],
     "positions": "last_function"}

`positions` is a name (`POSITIONS`) or a position object (`Positions`: a base selector narrowed by windows, chat
roles and token ids), e.g. `{"select": "function", "last_prompt": 8, "first_generated": 4, "exclude_ids": [13]}`.

`parse_steering` is the one way in, called once per process where input enters it (functok's HTTP edge, vLLM's
admission hook for stock `vllm serve`, a vLLM worker): schema, limits, the loaded SAEs (`SteeringInfo`) and the
vectors' names (resolved once to their content and bound to this engine's layers, so a spec keeps the numbers it
started with whatever happens to the name later; `"version"` pins one). Its canonical JSON, `SteeringSpec.key()`, is
the user's object with sorted keys and each vector's version filled in: the wire form a vLLM worker parses with the
same function, and the steering table's slot key. It sits above the core (which applies a spec by duck typing) and
below the server (no HTTP here: a bad object is a `SpecError` naming the user's field and index, which each edge
turns into its own 400).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, model_validator

from functok_vllm.core.spec import CLAMPS, MODES, POSITIONS, PROJECTIONS, STRENGTH_UNITS, SpecError
from functok_vllm.core.vector import Vector
from functok_vllm.positions import AnyPositions, Positions, check_positions
from functok_vllm.steering_setup import SteeringInfo, SteeringLimits
from functok_vllm.steering_when import Condition, check_condition, check_numbers
from functok_vllm.validation import FieldError, Strict, StrictFloat, StrictInt, describe, shown

# mode -> (fields it needs, fields it may take) among the numbers of an edit; `cap` needs `min` or `max` or both
MODE_FIELDS = {
    "add": ({"strength"}, {"strength", "strength_unit"}),
    "clamp": ({"value"}, {"value"}),
    "ablate": (set(), set()),
    "project_out": (set(), set()),
    "cap": (set(), {"min", "max"}),
    "set": ({"value"}, {"value"}),
}
NUMBERS = ("strength", "value", "min", "max")


class Edit(Strict):
    """The numbers every edit may carry, checked against its mode (`MODE_FIELDS`).

    Projection modes act on the unit direction v = d / |d| (d: the feature's decoder row, or the vector's direction
    at a layer), with p = h . v read from the tensor h at the hook point before this request's edits:
    `project_out` removes it (h -= p v), `cap` clamps it into [min, max] (either bound may be left out), `set` sets it
    to `value`. `strength_unit: "token_norm"` makes an add's strength relative: strength * |h| * v per token.
    `when` (a `Condition`) gates any mode per token: where it does not hold the edit adds exactly nothing.
    """

    model_config = ConfigDict(frozen=True)
    strength: StrictFloat | None = None  # add: residual += strength * direction
    value: StrictFloat | None = None  # clamp: the feature's activation; set: the projection onto the unit direction
    min: StrictFloat | None = None  # cap: lowest projection onto the unit direction (None: no lower bound)
    max: StrictFloat | None = None  # cap: highest projection (None: no upper bound)
    strength_unit: Literal[STRENGTH_UNITS] | None = None  # add: "token_norm" = in units of the token's norm |h|
    when: Condition | None = None  # act only at tokens where this holds (None: at every selected token)

    @model_validator(mode="after")
    def _fields_fit_mode(self):
        need, may = MODE_FIELDS[self.mode]
        for name in (*NUMBERS, "strength_unit"):
            given = getattr(self, name) is not None
            if name in need and not given:
                raise FieldError(name, f"mode {self.mode!r} needs '{name}'")
            if name not in may and given:
                takes = " (it takes " + ", ".join(f"'{n}'" for n in sorted(may)) + ")" if may else ""
                raise FieldError(name, f"mode {self.mode!r} takes no '{name}'{takes}")
        if self.mode == "cap":
            if self.min is None and self.max is None:
                raise FieldError("max", "mode 'cap' needs 'min' or 'max' (or both)")
            if self.min is not None and self.max is not None and self.min > self.max:
                raise FieldError("min", f"mode 'cap' needs min <= max, got min {self.min!r} > max {self.max!r}")
        return self

    @property
    def bounds(self) -> tuple[float, float] | None:
        """A projection edit's interval for the projection onto the unit direction; None for other modes."""
        inf = float("inf")
        return {
            "project_out": (0.0, 0.0),
            "set": (self.value, self.value),
            "cap": (-inf if self.min is None else self.min, inf if self.max is None else self.max),
        }.get(self.mode)

    @property
    def per_norm(self) -> bool:
        """Is this an add whose strength is in units of the token's norm (of a unit direction)?"""
        return self.strength_unit == "token_norm"

    def numbers(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in NUMBERS if getattr(self, k) is not None}


class FeatureEdit(Edit):
    """Edit one SAE feature: `add` (residual += strength * W_dec[feature]), `clamp` (the feature's activation set to
    value, keeping the SAE's reconstruction error), `ablate` (clamped to 0), or a projection mode on the unit decoder
    direction W_dec[feature] / |W_dec[feature]| (`Edit`)."""

    layer: StrictInt
    feature: StrictInt
    mode: Literal[MODES] = "add"

    @property
    def clamp_value(self) -> float:
        return 0.0 if self.mode == "ablate" else self.value


VECTOR_NAME_MAX = 64  # a vector's name (the library checks its characters when it is stored)


class VectorEdit(Edit):
    """Add `strength` times a steering vector from the library at each of its layers, or move the projection onto
    its unit direction there (`project_out`, `cap`, `set`: `Edit`). `version` (the content id) pins one; parsing
    binds the edit to the vector's content (`content`) and to this engine's layers (`at`), and fills `version`, so the
    spec keeps the numbers it started with whatever happens to the name later."""

    vector: str = Field(min_length=1, max_length=VECTOR_NAME_MAX)  # a name in the library
    mode: Literal[("add", *PROJECTIONS)] = "add"
    version: str | None = Field(None, min_length=1, max_length=64)  # the content id it must have (else 400)
    _content: Vector | None = PrivateAttr(None)
    _at: dict = PrivateAttr(default_factory=dict)  # layer -> (d_model,) direction

    @model_validator(mode="before")
    @classmethod
    def _no_feature_fields(cls, data):
        if isinstance(data, dict):
            for name in ("layer", "feature"):
                if name in data:
                    raise ValueError(f"a vector edit takes no '{name}' (the vector says where it adds)")
            if data.get("mode") in CLAMPS:
                raise ValueError(f"a vector edit cannot {data['mode']} (that sets an SAE feature's activation)")
        return data

    @property
    def content(self) -> Vector | None:
        return self._content

    @property
    def at(self) -> dict:
        """{layer: (d_model,) direction} at this engine's layers (empty until bound)."""
        return self._at

    def bound(self, content: Vector, at: dict) -> VectorEdit:
        """This edit tied to `content` (its version filled in) and to directions by layer."""
        out = self.model_copy(update={"version": content.id})
        out._content, out._at = content, dict(at)
        return out

    def __eq__(self, other) -> bool:  # the fields, not the tensors they are bound to
        return isinstance(other, VectorEdit) and self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(json.dumps(self.model_dump(), sort_keys=True))


def _edit_kind(v) -> str:
    """Which model validates an edit: one naming a `vector`, or one naming an SAE feature."""
    return "VectorEdit" if isinstance(v, VectorEdit) or (isinstance(v, dict) and "vector" in v) else "FeatureEdit"


AnyEdit = Annotated[
    Annotated[FeatureEdit, Tag("FeatureEdit")] | Annotated[VectorEdit, Tag("VectorEdit")], Discriminator(_edit_kind)
]


class SteeringSpec(Strict):
    """A request's steering, as the user writes it and as every engine runs it: the one form.

    `key()` is its canonical JSON (sorted keys, vectors named with their version): the wire form the vLLM workers
    receive, the steering table's slot key and the prefix-cache salt's input; parsing it gives the same spec back.
    """

    model_config = ConfigDict(frozen=True)
    edits: tuple[AnyEdit, ...] = ()
    positions: AnyPositions = "function"
    _info: SteeringInfo | None = PrivateAttr(None)  # what `parse_steering` checked it against (this process)

    @model_validator(mode="before")
    @classmethod
    def _positions_form(cls, data):
        if isinstance(data, dict) and not isinstance(data.get("positions", ""), str | dict | Positions):
            names = ", ".join(POSITIONS)
            msg = f"must be a name ({names}) or a position object, got {shown(data['positions'])}"
            raise FieldError("positions", msg)
        return data

    @classmethod
    def from_dict(cls, obj: dict) -> SteeringSpec:
        """A steering object in the user's form, validated against the schema only (no limits, no SAEs: for code and
        tests that build specs; requests go through `parse_steering`)."""
        return cls.model_validate(obj)

    @property
    def features(self) -> tuple[FeatureEdit, ...]:
        return tuple(e for e in self.edits if isinstance(e, FeatureEdit))

    @property
    def vectors(self) -> tuple[VectorEdit, ...]:
        return tuple(e for e in self.edits if isinstance(e, VectorEdit))

    @property
    def contents(self) -> dict:
        """{version: Vector} of every bound vector the spec names, in its edits and in their conditions."""
        out = {v.version: v.content for v in self.vectors if v.content is not None}
        conds = [e.when for e in self.edits if e.when is not None and e.when.content is not None]
        return out | {c.version: c.content for c in conds}

    @property
    def layers(self) -> list[int]:
        return sorted({e.layer for e in self.features} | {layer for v in self.vectors for layer in v.at})

    @property
    def is_noop(self) -> bool:
        return not self.edits

    @property
    def select(self) -> str:
        """The base selector (`POSITIONS`) of `positions`."""
        return self.positions if isinstance(self.positions, str) else self.positions.select

    @property
    def roles(self) -> tuple[str, ...]:
        """The chat roles `positions` selects by (empty: none)."""
        return () if isinstance(self.positions, str) else self.positions.roles or ()

    def user_form(self) -> dict:
        """The steering object a user would send for this spec (vectors with their version)."""
        pos = self.positions
        pos = pos if isinstance(pos, str) else pos.model_dump(exclude_none=True, exclude_defaults=True)
        return {"edits": [e.model_dump(exclude_none=True) for e in self.edits], "positions": pos}

    def key(self) -> str:
        return json.dumps(self.user_form(), sort_keys=True, separators=(",", ":"))

    def local(self, layers) -> SteeringSpec | None:
        """The edits at `layers` (a pipeline-parallel rank's), None when none is left."""
        keep = set(layers)
        edits = []
        for e in self.edits:
            if isinstance(e, FeatureEdit):
                if e.layer in keep:
                    edits.append(e)
            elif any(layer in keep for layer in e.at):
                edits.append(e.bound(e.content, {k: d for k, d in e.at.items() if k in keep}))
        return SteeringSpec(edits=tuple(edits), positions=self.positions) if edits else None

    def __eq__(self, other) -> bool:
        return isinstance(other, SteeringSpec) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())


@dataclass
class SteeringContext:
    """What a steering object is parsed against in one process: what the engine can steer (`info`), the limits, and
    how a vector's name resolves (`lookup(name, version) -> Vector`, LookupError saying why not; None: no vectors)."""

    info: SteeringInfo
    limits: SteeringLimits = field(default_factory=SteeringLimits)
    lookup: Callable[[str, str | None], Vector] | None = None


def parse_steering(given, param: str, ctx: SteeringContext) -> SteeringSpec | None:
    """THE parser of a steering object, wherever one enters a process (the HTTP edge, vLLM's admission hook, a vLLM
    worker): the user's object (a dict, or its JSON text; the canonical `key()` is one such text) -> a SteeringSpec
    checked against `ctx`, its vectors bound to their content and to the engine's layers; None when it has no edits.
    SpecError whose field starts with `param` and names the user's own index (`steering.edits[1].feature`)."""
    if isinstance(given, str):
        given = _json_object(given, param)
    if not isinstance(given, dict):
        raise SpecError(param, f"must be a JSON object, got {shown(given)}")
    try:
        spec = SteeringSpec.model_validate(given)
    except ValidationError as e:
        errors = e.errors()
        why = errors[0].get("ctx", {}).get("error")
        if isinstance(why, FieldError):  # the field an edit's own check found (`steering.edits[0].min`)
            errors = [{**errors[0], "loc": (*errors[0]["loc"], why.field)}]
        where, msg = describe(errors, tuple(param.split(".")))
        raise SpecError(where or param, msg) from None
    limits, info = ctx.limits, ctx.info
    if len(spec.edits) > limits.max_edits:
        raise SpecError(f"{param}.edits", f"{len(spec.edits)} edits; at most {limits.max_edits} are allowed")
    check_positions(spec, limits, f"{param}.positions")
    n_when = sum(e.when is not None for e in spec.edits)
    if n_when > limits.max_conditions:
        msg = f"{n_when} edits with 'when'; at most {limits.max_conditions} are allowed (max_conditions)"
        raise SpecError(f"{param}.edits", msg)
    if spec.is_noop:
        return None
    edits, clamped, projected = [], set(), set()
    for i, e in enumerate(spec.edits):
        where = f"{param}.edits[{i}]"
        if e.mode in PROJECTIONS:  # two projections onto one direction would both read h: refuse, as for clamps
            direction = (e.vector, e.version) if isinstance(e, VectorEdit) else (e.layer, e.feature)
            if direction in projected:
                what = f"vector {e.vector!r}" if isinstance(e, VectorEdit) else f"feature {e.feature}, layer {e.layer}"
                raise SpecError(f"{where}.mode", f"{what} has two projection edits; give it one")
            projected.add(direction)
        if isinstance(e, VectorEdit):
            check_numbers(limits, e.numbers(), where)
            e = _bind(e, ctx, where)
        else:
            check_feature(info, limits, e.layer, e.feature, e.numbers(), where)
        if e.when is not None:
            e = _bind_condition(e, ctx, f"{where}.when")
        if isinstance(e, FeatureEdit) and e.mode in CLAMPS:
            if not info.clamp_ok[e.layer]:
                arch = info.sae[e.layer]["architecture"]
                raise SpecError(
                    f"{where}.mode",
                    f"{e.mode} needs one feature's activation; the SAE at layer {e.layer} is {arch}, whose "
                    "activations depend on every feature",
                )
            if (e.layer, e.feature) in clamped:
                raise SpecError(where, f"feature {e.feature} at layer {e.layer} is clamped twice")
            clamped.add((e.layer, e.feature))
        edits.append(e)
    out = SteeringSpec(edits=tuple(edits), positions=spec.positions)
    out._info = info
    return out


def checked(spec: SteeringSpec, ctx: SteeringContext, param: str = "steering") -> SteeringSpec:
    """`spec` itself when `parse_steering` made it against `ctx.info` in this process (the check is not repeated),
    else parsed and checked now from its user form (a spec built in code, e.g. by `SteeringSpec.from_dict`), its bound
    vectors resolving to the content they carry."""
    if spec._info is not None and (spec._info is ctx.info or spec._info.accepts_like(ctx.info)):
        return spec
    carried = spec.contents

    def lookup(name: str, version: str | None) -> Vector:
        if version in carried:
            return carried[version]
        if ctx.lookup is None:
            raise LookupError(f"vector {name!r} is not bound to a content")
        return ctx.lookup(name, version)

    return parse_steering(spec.user_form(), param, SteeringContext(ctx.info, ctx.limits, lookup))


def _resolve(name: str, version: str | None, ctx: SteeringContext, where: str) -> tuple[Vector, dict]:
    """(content, {layer: direction}) of a named vector at this engine's layers; SpecError naming `{where}.vector`."""
    if ctx.lookup is None:
        raise SpecError(f"{where}.vector", "this server has no steering vectors")
    try:
        v = ctx.lookup(name, version)
    except LookupError as err:
        raise SpecError(f"{where}.vector", err.args[0] if err.args else str(err)) from None
    info = ctx.info
    if info.d_model is not None and v.d_model != info.d_model:
        msg = f"vector {name!r} is {v.d_model} wide; this model's d_model is {info.d_model}"
        raise SpecError(f"{where}.vector", msg)
    try:
        return v, v.at(info.hook_layers)
    except KeyError as err:
        msg = f"vector {name!r} has directions at {err.args[0]}, where this server does not steer; "
        raise SpecError(f"{where}.vector", msg + info.describe_layers()) from None


def _bind_condition(e: Edit, ctx: SteeringContext, where: str) -> Edit:
    """The edit with its `when` checked at every layer where the edit acts (`steering_when.check_condition`) and,
    for a vector condition, bound to the vector's content; SpecError naming `{where}.feature` / `.vector` etc."""
    layers = [e.layer] if isinstance(e, FeatureEdit) else sorted(e.at)
    resolve = lambda name, version: _resolve(name, version, ctx, where)  # noqa: E731
    out = e.model_copy(update={"when": check_condition(e.when, layers, ctx.info, ctx.limits, resolve, where)})
    if isinstance(e, VectorEdit):
        out._content, out._at = e.content, dict(e.at)
    return out


def _bind(e: VectorEdit, ctx: SteeringContext, where: str) -> VectorEdit:
    """The edit bound to its vector's content and to this engine's layers; SpecError naming `{where}.vector`."""
    v, at = _resolve(e.vector, e.version, ctx, where)
    if e.mode != "add" or e.per_norm:  # these act on the unit direction, which a zero direction does not have
        zero = [layer for layer, d in at.items() if not bool(d.abs().max() > 0)]
        if zero:
            msg = f"vector {e.vector!r} is zero at layer {zero[0]}: it has no direction to {e.mode} along"
            raise SpecError(f"{where}.{'strength_unit' if e.mode == 'add' else 'mode'}", msg)
    return e.bound(v, at)


def check_feature(
    info: SteeringInfo, limits: SteeringLimits, layer: int, feature: int, values: dict, where: str, layer_at=None
) -> None:
    """One SAE feature with its strength/value: an SAE at `layer`, the feature inside it, every value within the
    strength limit. SpecError names `{where}.feature` etc.; `layer_at` the layer's field when it is not
    `{where}.layer` (a vector built from features names its layer once)."""
    check_numbers(limits, values, where)
    if layer not in info.d_sae:
        have = ", ".join(map(str, sorted(info.d_sae))) or "none"
        raise SpecError(layer_at or f"{where}.layer", f"no SAE is loaded at layer {layer} (layers with SAEs: {have})")
    if not 0 <= feature < info.d_sae[layer]:
        raise SpecError(
            f"{where}.feature", f"{feature} is outside [0, {info.d_sae[layer]}) for the SAE at layer {layer}"
        )


def _json_object(text: str, param: str) -> dict:
    def no_constants(name):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        obj = json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the interpreter's stack
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise SpecError(param, f"not a valid JSON object ({why})") from None
    if not isinstance(obj, dict):
        raise SpecError(param, f"must be a JSON object, got {shown(obj)}")
    return obj
