"""Steering specs: which features to push or clamp, at which layers, at which positions of a request."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

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
class SteeringSpec:
    edits: tuple[Edit, ...] = field(default_factory=tuple)
    positions: str = "function"

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
        return sorted({e.layer for e in self.edits})

    @property
    def is_noop(self) -> bool:
        return not self.edits

    def key(self) -> str:
        """Canonical JSON: equal specs share a slot in the steering table and a prefix-cache salt."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict:
        return {"edits": [asdict(e) for e in self.edits], "positions": self.positions}

    @classmethod
    def from_dict(cls, d: dict) -> SteeringSpec:
        """Internal constructor for already-validated dicts (the HTTP edge validates user input with pydantic)."""
        return cls(tuple(Edit(**e) for e in d.get("edits", ())), d.get("positions", "function"))
