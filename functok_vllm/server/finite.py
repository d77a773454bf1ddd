"""Non-finite numbers never reach JSON: every response body and stream event is written with `dumps`, which writes
NaN and +-Infinity (not JSON) as null, and log-probabilities are floored at -9999.0 as vLLM floors them.

A steered model driven past float32's range (a long direction times a large strength) produces inf and NaN
activations; its log-probabilities are then -inf (written -9999.0, `NEG_LOGPROB`) or NaN (written null: the model
gave no probability at that position), and feature activations that are not finite are null. The response stays
valid JSON for every client (Python's `json` would write the non-JSON literals `NaN` and `Infinity`; Starlette's
JSONResponse refuses them with a 500).
"""

from __future__ import annotations

import json
import math

from fastapi.responses import JSONResponse

NEG_LOGPROB = -9999.0  # what vLLM's OpenAI server writes for a log-probability of -inf


def logprob(v: float) -> float | None:
    """A log-probability as written: itself, floored at NEG_LOGPROB (-inf too); None for NaN."""
    if v >= NEG_LOGPROB:
        return v if v != math.inf else None
    return None if math.isnan(v) else NEG_LOGPROB


def finite(obj):
    """`obj` with every non-finite float replaced by None (a copy of the containers that hold one)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def dumps(obj) -> str:
    """Strict JSON text of `obj`; non-finite floats as null (walking the object only when there is one)."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(finite(obj), ensure_ascii=False, allow_nan=False)


class FiniteJSONResponse(JSONResponse):
    """The app's response class (FastAPI's `default_response_class`): `dumps` instead of Starlette's strict dump."""

    def render(self, content) -> bytes:
        return dumps(content).encode("utf-8")
