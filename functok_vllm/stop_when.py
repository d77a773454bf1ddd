"""A request's `stop_when`: stop (or flag) a generation when one read-out series crosses a threshold for k tokens.

    "stop_when": {"feature": {"layer": 2, "feature": 1493}, "above": 3.0, "tokens": 2, "action": "stop"}
    "stop_when": {"vector": "calm", "layer": 2, "below": -1.0, "action": "flag"}

The series is read exactly as a `readout` series (`readout_request.py`: a feature's activation as its SAE encodes it,
or the projection on a vector's unit direction at `layer`, after the request's edits there) at each position that
predicts a generated token. The monitor *triggers* at the generated token whose predicting position completes
`tokens` consecutive positions where the value is strictly above `above` and strictly below `below`.
`action: "stop"` ends the generation there (that token is the last one; finish_reason "stop"), which needs the
value per step in the engine loop: the transformers engine checks it after each step (`_monitor_hit`), the vLLM
engine fetches each delta's values from the workers and holds the delta back until they are checked, then aborts
the request (`engines/vllm/engine.py`; stock `vllm serve` cannot); `"flag"` lets it run and reports where it would
have triggered, on both engines. Either way the choice's `monitor` says whether, where (the position and the generated
token's index) and with which values. A bad object is a SpecError naming the field (`stop_when.tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from functok_vllm.core.readout import Probe
from functok_vllm.core.spec import SpecError
from functok_vllm.readout_request import FeatureIn, parse_readout
from functok_vllm.steering import SteeringInfo, Strict, StrictFloat, StrictInt
from functok_vllm.validation import validated

MAX_TOKENS = 256  # the longest run of positions a monitor may wait for


class StopWhenIn(Strict):
    feature: FeatureIn | None = None  # an SAE feature's activation
    vector: str | None = Field(None, min_length=1, max_length=64)  # or the projection on a library vector
    layer: StrictInt | None = None  # the vector's layer (needed when it has several)
    above: StrictFloat | None = None
    below: StrictFloat | None = None
    tokens: StrictInt = Field(1, ge=1, le=MAX_TOKENS)  # consecutive positions the condition must hold at
    action: Literal["stop", "flag"] = "stop"


@dataclass(frozen=True)
class StopWhen:
    probe: Probe
    label: dict  # {"layer", "feature"} or {"vector", "layer"}
    lo: float  # holds where lo < value < hi
    hi: float
    tokens: int
    action: str
    series: int = -1  # its column among the request's read-out series (set when the server joins it to them)

    def holds(self, value: float) -> bool:
        return self.lo < value < self.hi

    def trigger(self, values: list[float]) -> int | None:
        """Index into `values` (one per generated token, in order) of the token where `tokens` consecutive values
        first hold, or None."""
        run = 0
        for i, v in enumerate(values):
            run = run + 1 if self.holds(v) else 0
            if run >= self.tokens:
                return i
        return None


def parse_stop_when(given, info: SteeringInfo, lookup: Callable | None, param: str = "stop_when") -> StopWhen | None:
    """A user's stop_when object -> StopWhen (its series checked as a readout's); None for None."""
    if given is None:
        return None
    s = validated(StopWhenIn, given, param)
    if (s.feature is None) == (s.vector is None):
        raise SpecError(f"{param}.feature", "name one 'feature' or one 'vector'")
    if s.layer is not None and s.vector is None:
        raise SpecError(f"{param}.layer", "'layer' picks a vector's layer; a feature names its own")
    if s.above is None and s.below is None:
        raise SpecError(f"{param}.above", "give 'above' or 'below' (or both)")
    if s.above is not None and s.below is not None and not s.above < s.below:
        raise SpecError(f"{param}.above", f"needs above < below, got above {s.above!r} >= below {s.below!r}")
    for name in ("above", "below"):
        v = getattr(s, name)
        if v is not None and abs(v) > 1e30:
            raise SpecError(f"{param}.{name}", f"{v!r} is not a usable threshold")
    one = {"features": [s.feature.model_dump()]} if s.feature is not None else {"vectors": [s.vector]}
    try:
        r = parse_readout(one, info, lookup, 256, param)
    except SpecError as e:  # name the user's field, not the readout form it was checked as
        where = e.field.replace(f"{param}.features[0]", f"{param}.feature").replace(
            f"{param}.vectors[0]", f"{param}.vector"
        )
        raise SpecError(where, e.message) from None
    if s.feature is not None:
        probe, label = r.probes[0], r.labels[0]
    else:
        layers = [lab["layer"] for lab in r.labels]
        pick = s.layer if s.layer is not None else (layers[0] if len(layers) == 1 else None)
        if pick is None:
            raise SpecError(f"{param}.layer", f"vector {s.vector!r} is at layers {layers}: name one with 'layer'")
        if pick not in layers:
            raise SpecError(f"{param}.layer", f"vector {s.vector!r} has no direction at layer {pick} (it has {layers})")
        i = layers.index(pick)
        probe, label = r.probes[i], r.labels[i]
    inf = float("inf")
    lo = -inf if s.above is None else s.above
    hi = inf if s.below is None else s.below
    return StopWhen(probe, label, lo, hi, s.tokens, s.action)
