"""The vocabulary of steering shared by the core and every layer above it: modes, position policies, the error type.

The steering object itself (`SteeringSpec`, its edits, its one parser) is `functok_vllm.steering`; the core applies
a spec by its attributes (`features`, `vectors`, `positions`, `key()`), never by importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

MODES = ("add", "clamp", "ablate")
POSITIONS = ("function", "last_function", "content", "prompt", "generated", "all")
MAX_ABS_STRENGTH = 1e4  # beyond this an edit only produces NaN logits; refuse it rather than serve garbage


class SpecError(ValueError):
    """A steering spec that cannot be applied; `field` names the offending field (e.g. `edits[1].feature`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Spec(Protocol):
    """What the core reads of a steering spec (`functok_vllm.steering.SteeringSpec` is the one implementation)."""

    positions: str

    @property
    def features(self) -> Sequence: ...  # edits of SAE features: .layer .feature .mode .strength .clamp_value

    @property
    def vectors(self) -> Sequence: ...  # vector edits: .strength and .at, {layer: (d_model,) direction}

    @property
    def is_noop(self) -> bool: ...

    def key(self) -> str: ...  # canonical JSON: equal specs share a slot
