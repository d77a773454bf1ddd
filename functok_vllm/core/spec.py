"""Steering specs: which features to push or clamp and which vectors to add, at which layers and positions."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

MODES = ("add", "clamp", "ablate")
POSITIONS = ("function", "last_function", "content", "prompt", "generated", "all")
MAX_ABS_STRENGTH = 1e4  # beyond this an edit only produces NaN logits; refuse it rather than serve garbage


class SpecError(ValueError):
    """A steering spec that cannot be applied; `field` names the offending field (e.g. `edits[1].feature`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Edit:
    layer: int
    feature: int
    mode: str = "add"
    strength: float = 0.0  # add: residual += strength * W_dec[feature]
    value: float = 0.0  # clamp: the feature's activation is set to value (ablate: 0), keeping the SAE error

    def __post_init__(self):
        if self.mode not in MODES:
            raise SpecError("mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("strength", "value"):
            v = getattr(self, name)
            if not math.isfinite(v) or abs(v) > MAX_ABS_STRENGTH:
                raise SpecError(name, f"{v!r} must be finite and at most {MAX_ABS_STRENGTH:g} in magnitude")

    @property
    def clamp_value(self) -> float:
        return 0.0 if self.mode == "ablate" else self.value


@dataclass(frozen=True)
class VectorEdit:
    """Add `strength` times a steering vector (`core.vector.Vector`) at each of its layers.

    `vector` is the vector's content id, all that equality and `SteeringSpec.key()` see: two edits of one id add the
    same numbers. `name` (what the user called it), `at` (its directions by this engine's layer number, bound when
    the spec was parsed) and `content` (the `core.vector.Vector` itself, where the spec was parsed from a name) ride
    along.
    """

    vector: str
    strength: float
    name: str = field(default="", compare=False)
    at: Mapping[int, Any] = field(default_factory=dict, compare=False, repr=False)  # layer -> (d_model,) tensor
    content: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not math.isfinite(self.strength) or abs(self.strength) > MAX_ABS_STRENGTH:
            raise SpecError(
                "strength", f"{self.strength!r} must be finite and at most {MAX_ABS_STRENGTH:g} in magnitude"
            )


@dataclass(frozen=True)
class SteeringSpec:
    edits: tuple[Edit, ...] = field(default_factory=tuple)
    positions: str = "function"
    vectors: tuple[VectorEdit, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise SpecError("positions", f"{self.positions!r} is not one of {', '.join(POSITIONS)}")
        seen = set()
        for i, e in enumerate(self.edits):
            if e.mode != "add":
                if (e.layer, e.feature) in seen:
                    raise SpecError(f"edits[{i}]", f"feature {e.feature} at layer {e.layer} is clamped twice")
                seen.add((e.layer, e.feature))

    @property
    def layers(self) -> list[int]:
        return sorted({e.layer for e in self.edits} | {layer for v in self.vectors for layer in v.at})

    @property
    def is_noop(self) -> bool:
        return not (self.edits or self.vectors)

    def key(self) -> str:
        """Canonical JSON: equal specs share a slot in the steering table and a prefix-cache salt."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict:
        """Vectors by content id (and only when there are some: a feature-only spec keeps the key it always had)."""
        out = {"edits": [asdict(e) for e in self.edits], "positions": self.positions}
        if self.vectors:
            out["vectors"] = [{"vector": v.vector, "strength": v.strength} for v in self.vectors]
        return out

    @classmethod
    def from_dict(cls, d: dict, bound: Mapping[str, Mapping[int, Any]] | None = None) -> SteeringSpec:
        """Internal constructor for already-validated dicts (the HTTP edge validates user input with pydantic);
        `bound` maps each vector id in `d` to its directions by layer (SpecError naming an id it lacks)."""
        vectors = []
        for i, v in enumerate(d.get("vectors", ())):
            if v["vector"] not in (bound or {}):
                raise SpecError(f"vectors[{i}].vector", f"no directions were given for vector {v['vector']!r}")
            vectors.append(VectorEdit(v["vector"], v["strength"], at=bound[v["vector"]]))
        return cls(tuple(Edit(**e) for e in d.get("edits", ())), d.get("positions", "function"), tuple(vectors))
