"""The `when` of a steering edit, a per-token condition: its schema (`Condition`) and its check against one engine at
the layers where the edit acts (`check_condition`, the layer rule).

The layer rule: a condition is read at the layer where its edit acts, from that layer's SAE (a feature's activation,
encoded exactly as the SAE encodes it) or from the named vector's direction at that layer (the projection h . v onto
its unit direction); an edit acting at several layers (a vector) is gated at each of them by the condition read
there, and a condition that cannot be read at one of them is refused naming the field.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from functok_vllm.core.spec import SpecError
from functok_vllm.core.vector import Vector
from functok_vllm.steering_setup import SteeringInfo, SteeringLimits
from functok_vllm.validation import FieldError, Strict, StrictFloat, StrictInt


class Condition(Strict):
    """`when` on an edit: the edit acts only at tokens where this holds, read at the same token from the tensor h at
    the hook point of each layer where the edit acts, before this request's edits (what every term reads).

    It reads one SAE feature's activation (`feature`: the SAE at that layer, encoded exactly as the SAE does) or the
    projection h . v onto a vector's unit direction there (`vector`, `version` pinning one), and holds where that
    number is strictly above `above` and strictly below `below` (either may be left out, not both)."""

    model_config = ConfigDict(frozen=True)
    feature: StrictInt | None = None  # an SAE feature at the edit's layer
    vector: str | None = Field(None, min_length=1, max_length=64)  # or a vector in the library (VECTOR_NAME_MAX)
    version: str | None = Field(None, min_length=1, max_length=64)  # the vector's content id (parsing fills it)
    above: StrictFloat | None = None  # holds where the reading is > above (None: no lower threshold)
    below: StrictFloat | None = None  # holds where the reading is < below (None: no upper threshold)
    _content: Vector | None = PrivateAttr(None)
    _at: dict = PrivateAttr(default_factory=dict)  # layer -> (d_model,) direction of the vector (empty for features)

    @model_validator(mode="after")
    def _one_reading(self):
        if (self.feature is None) == (self.vector is None):
            raise FieldError("feature", "a condition names one 'feature' or one 'vector'")
        if self.version is not None and self.vector is None:
            raise FieldError("version", "only a vector condition takes 'version'")
        if self.above is None and self.below is None:
            raise FieldError("above", "a condition needs 'above' or 'below' (or both)")
        if self.above is not None and self.below is not None and not self.above < self.below:
            raise FieldError("above", f"needs above < below, got above {self.above!r} >= below {self.below!r}")
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        """(above, below) with missing thresholds as -inf / inf: the condition holds where above < reading < below."""
        inf = float("inf")
        return (-inf if self.above is None else self.above, inf if self.below is None else self.below)

    @property
    def content(self) -> Vector | None:
        return self._content

    @property
    def at(self) -> dict:
        """{layer: (d_model,) direction} of a vector condition at this engine's layers (empty until bound)."""
        return self._at

    def bound(self, content: Vector, at: dict) -> Condition:
        out = self.model_copy(update={"version": content.id})
        out._content, out._at = content, dict(at)
        return out

    def numbers(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("above", "below") if getattr(self, k) is not None}

    def __eq__(self, other) -> bool:  # the fields, not the tensors they are bound to
        return isinstance(other, Condition) and self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(tuple(self.model_dump().items()))


def check_numbers(limits: SteeringLimits, values: dict, where: str) -> None:
    for name, v in values.items():
        if abs(v) > limits.max_abs_strength:
            raise SpecError(f"{where}.{name}", f"{v!r} exceeds the limit of {limits.max_abs_strength:g}")


def check_condition(
    c: Condition,
    layers: list[int],
    info: SteeringInfo,
    limits: SteeringLimits,
    resolve: Callable[[str, str | None], tuple[Vector, dict]],
    where: str,
) -> Condition:
    """`c` checked for an edit acting at `layers` (the layer rule) and, for a vector, bound to its content;
    `resolve(name, version) -> (content, {layer: direction})` finds a vector (SpecError naming `{where}.vector`).
    SpecError naming `{where}.feature` / `.vector` / `.above` / `.below` otherwise."""
    check_numbers(limits, c.numbers(), where)
    if c.feature is not None:
        for layer in layers:
            if layer not in info.d_sae:
                msg = f"the edit acts at layer {layer}, which has no SAE to read feature {c.feature} from"
                raise SpecError(f"{where}.feature", msg + " (a condition is read at the edit's own layers)")
            if not 0 <= c.feature < info.d_sae[layer]:
                msg = f"{c.feature} is outside [0, {info.d_sae[layer]}) for the SAE at layer {layer}"
                raise SpecError(f"{where}.feature", msg)
            if not info.clamp_ok[layer]:
                arch = info.sae[layer]["architecture"]
                msg = f"a feature condition needs one feature's activation; the SAE at layer {layer} is {arch}, "
                raise SpecError(f"{where}.feature", msg + "whose activations depend on every feature")
        return c
    v, at = resolve(c.vector, c.version)
    for layer in layers:
        if layer not in at:
            msg = f"vector {c.vector!r} has no direction at layer {layer}, where the edit acts (a condition is read "
            raise SpecError(f"{where}.vector", msg + "at the edit's own layers)")
        if not bool(at[layer].abs().max() > 0):
            raise SpecError(f"{where}.vector", f"vector {c.vector!r} is zero at layer {layer}: it has no direction")
    return c.bound(v, {layer: at[layer] for layer in layers})
