"""Server configuration: request limits and named steering presets, read from a JSON file (`functok serve --config`).

    {"limits": {"max_edits": 8, "max_abs_strength": 200, "max_tokens": 256},
     "presets": {"calm": {"edits": [{"layer": 2, "feature": 1234, "strength": 8.0}], "positions": "function"}}}

Presets are validated like a request's `steering` object when the server starts (against the loaded SAEs too), so a
bad preset stops the server instead of failing requests later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from functok_vllm.core.spec import MAX_ABS_STRENGTH
from functok_vllm.errors import CLIError


@dataclass
class Limits:
    max_edits: int = 16  # edits per request (each clamp takes one of the engine's clamp columns at its layer)
    max_abs_strength: float = 1000.0  # |strength| and |value|; residual norms of large models reach a few hundred
    max_tokens: int = 4096  # per request, on top of the model's context length
    max_running: int = 32  # requests decoded together
    max_waiting: int = 128  # requests queued beyond the running batch; more get 429
    max_body_bytes: int = 1 << 20  # request bodies above this get 413

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise CLIError(f"limits.{f.name} must be a number, got {v!r}")
        for name in ("max_edits", "max_tokens", "max_running", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise CLIError(f"limits.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise CLIError(f"limits.max_waiting must be at least 0, got {self.max_waiting}")
        if not 0 < self.max_abs_strength <= MAX_ABS_STRENGTH:
            raise CLIError(f"limits.max_abs_strength must be in (0, {MAX_ABS_STRENGTH:g}], got {self.max_abs_strength}")


@dataclass
class ServerConfig:
    limits: Limits = field(default_factory=Limits)
    presets: dict[str, dict] = field(default_factory=dict)  # name -> steering object, checked by the server at start
    api_key: str | None = None  # bearer token for /v1/*; never logged

    def __post_init__(self):
        for name, spec in self.presets.items():
            if not name or not isinstance(spec, dict):
                raise CLIError(f"presets.{name}: a preset is a non-empty name mapped to a steering object")

    @classmethod
    def load(cls, path: str | Path) -> ServerConfig:
        p = Path(path)
        if not p.is_file():
            raise CLIError(f"config file {p} does not exist")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"config file {p} is not valid JSON: {e}") from None
        if not isinstance(raw, dict) or set(raw) - {"limits", "presets"}:
            raise CLIError(f"config file {p}: expected an object with only 'limits' and 'presets'")
        limits = raw.get("limits", {})
        known = {f.name for f in fields(Limits)}
        if not isinstance(limits, dict):
            raise CLIError(f"config file {p}: 'limits' must be an object")
        if set(limits) - known:
            raise CLIError(f"config file {p}: unknown limits {sorted(set(limits) - known)}; known: {sorted(known)}")
        presets = raw.get("presets", {})
        if not isinstance(presets, dict):
            raise CLIError(f"config file {p}: 'presets' must map names to steering objects")
        return cls(Limits(**limits), presets)
