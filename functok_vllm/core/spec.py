"""The vocabulary of steering shared by the core and every layer above it: modes, position policies, the error type.

The steering object itself (`SteeringSpec`, its edits, its one parser) is `functok_vllm.steering`; the core applies
a spec by its attributes (`features`, `vectors`, `positions`, `key()`), never by importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

MODES = ("add", "clamp", "ablate", "project_out", "cap", "set")
CLAMPS = ("clamp", "ablate")  # modes that set one SAE feature's activation (a clamp column each)
PROJECTIONS = ("project_out", "cap", "set")  # modes that move the projection onto a unit direction (a column each)
STRENGTH_UNITS = ("absolute", "token_norm")  # an add's strength: as given, or times the token's norm at the hook point
POSITIONS = ("function", "last_function", "content", "prompt", "generated", "all")
ROLES = ("system", "user", "assistant")  # chat roles a position object may select; role code = index + 1 (0: none)
MAX_ABS_STRENGTH = 1e4  # beyond this an edit only produces NaN logits; refuse it rather than serve garbage


class SpecError(ValueError):
    """A steering spec that cannot be applied; `field` names the offending field (e.g. `edits[1].feature`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Spec(Protocol):
    """What the core reads of a steering spec (`functok_vllm.steering.SteeringSpec` is the one implementation)."""

    positions: str | object  # a POSITIONS name, or a position object (.select .token_ids .exclude_ids ...)

    @property
    def features(self) -> Sequence: ...  # SAE feature edits: .layer .feature .mode .strength .clamp_value .bounds

    # (.bounds: a projection edit's (lo, hi) interval for the projection onto the unit direction, else None;
    # .per_norm: an add whose strength is in units of the token's norm; .when: None, or a condition with .feature
    # (an SAE feature id, or None) .at ({layer: direction} of a vector condition) and .bounds ((above, below)))

    @property
    def vectors(self) -> Sequence: ...  # vector edits: .mode .strength .bounds .per_norm and .at, {layer: direction}

    @property
    def is_noop(self) -> bool: ...

    def key(self) -> str: ...  # canonical JSON: equal specs share a slot
