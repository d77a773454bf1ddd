"""Server configuration: request limits and named steering presets, from a JSON file (`--config`) and CLI flags.

    {"limits": {"max_edits": 8, "max_abs_strength": 200, "max_tokens": 256, "request_timeout": 120},
     "presets": {"calm": {"edits": [{"layer": 2, "feature": 1234, "strength": 8.0}], "positions": "function"}}}

Every limit is also a `functok serve` flag (`--max-running 16`, `--request-timeout 60`, ...) that overrides the file.
What each limit answers when it is hit is in its help text; `GET /v1/steering` shows the limits in force.
Presets are validated like a request's `steering` object when the server starts (against the loaded SAEs too), so a
bad preset stops the server instead of failing requests later. These presets are read-only; presets created through
the API (`/v1/steering/presets`) live in the steering library beside the vectors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from functok_vllm.errors import CLIError
from functok_vllm.steering import SteeringLimits


def _limit(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class Limits:
    max_tokens: int = _limit(4096, "largest max_tokens a request may ask for (more get 400); chat default")
    max_running: int = _limit(32, "requests decoded together in one batch")
    max_waiting: int = _limit(128, "requests queued beyond the running batch; more get 429 with Retry-After")
    max_body_bytes: int = _limit(1 << 20, "request body size; larger bodies get 413")
    request_timeout: float = _limit(
        600.0,
        "seconds from a request's arrival to its last token; past it the generation is aborted and the answer is "
        "504 (code 'timeout'), or, once a stream has started, a final error event with code 'timeout'",
    )
    drain_timeout: float = _limit(
        30.0,
        "seconds SIGTERM/SIGINT waits for in-flight requests (new ones get 503); then the rest are aborted "
        "(503 / an error event) and the server exits 0",
    )
    max_choices: int = _limit(
        64,
        "choices one request may ask for: prompts x steering specs x n, each an engine request decoded in the same "
        "batch; more get 400",
    )
    max_feature_values: int = _limit(
        1 << 20,
        "feature activations one request may ask for: choices x positions (max_tokens, plus the prompt with "
        "features.prompt) x layers x top_k; more get 400",
    )
    max_prompt_logprob_values: int = _limit(
        1 << 18,
        "log-probabilities prompt scoring (echo) may return in one request: prompt tokens of every choice x "
        "(logprobs + 1); more get 400 (checked before any work starts)",
    )
    max_capture_bytes: int = _limit(
        16 << 20,
        "activation bytes a request's `capture` may return (before base64): choices x positions (prompt + max_tokens "
        "for 'all' and 'function') x layers x d_model x dtype size; more get 413, before any work starts",
    )
    max_readouts: int = _limit(
        32,
        "series one request's `readout` may read (each feature, and each vector once per layer it has); more get 400",
    )
    max_example_prompts: int = _limit(
        256, "prompts (positive and negative together) one steering vector from examples may use; more get 400"
    )
    max_example_tokens: int = _limit(1024, "tokens of each prompt of a steering vector from examples; longer get 400")
    max_analysis_prompts: int = _limit(16, "prompts in one POST /v1/analysis/reactivation; more get 400")
    max_analysis_waiting: int = _limit(4, "analysis requests queued behind the running one; more get 429")
    max_vectors: int = _limit(256, "named steering vectors in the library; creating more gets 409")
    max_presets: int = _limit(256, "presets stored through the API; creating more gets 409")
    max_vector_bytes: int = _limit(
        16 << 20, "body of a request that creates or replaces a steering vector (JSON or file); larger get 413"
    )
    header_timeout: float = _limit(
        10.0, "seconds a client may take to send a request's line and headers; slower ones are disconnected"
    )
    body_timeout: float = _limit(
        30.0, "seconds a client may take to send a request's whole body; slower ones get 408 and are disconnected"
    )
    keep_alive_timeout: float = _limit(5.0, "seconds an idle keep-alive connection stays open")
    max_connections: int = _limit(
        256, "open connections (each a request in flight or an idle keep-alive); requests past it get 503"
    )
    max_header_bytes: int = _limit(64 * 1024, "size of a request's line and headers; larger get 400")

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise CLIError(f"limits.{f.name} must be a number, got {v!r}")
            if isinstance(f.default, int) and not isinstance(v, int):
                raise CLIError(f"limits.{f.name} must be a whole number, got {v!r}")
        at_least_one = ("max_tokens", "max_running", "max_body_bytes", "max_choices", "max_feature_values")
        at_least_one += ("max_connections", "max_header_bytes", "max_prompt_logprob_values")
        at_least_one += ("max_capture_bytes", "max_example_prompts", "max_example_tokens", "max_readouts")
        for name in (*at_least_one, "max_analysis_prompts", "max_vector_bytes"):
            if getattr(self, name) < 1:
                raise CLIError(f"limits.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_waiting", "max_analysis_waiting", "max_vectors", "max_presets"):
            if getattr(self, name) < 0:
                raise CLIError(f"limits.{name} must be at least 0, got {getattr(self, name)}")
        for name in ("request_timeout", "drain_timeout", "header_timeout", "body_timeout", "keep_alive_timeout"):
            if getattr(self, name) <= 0:
                raise CLIError(f"limits.{name} must be a positive number of seconds, got {getattr(self, name)}")


def limit_fields() -> list:
    """Every limit a `--config` file's "limits" and a `functok serve` flag can set: the server's and steering's."""
    return [*fields(Limits), *fields(SteeringLimits)]


@dataclass
class ServerConfig:
    limits: Limits = field(default_factory=Limits)
    steering: SteeringLimits = field(default_factory=SteeringLimits)
    presets: dict[str, dict] = field(default_factory=dict)  # name -> steering object, checked by the server at start
    api_key: str | None = None  # bearer token for every endpoint but /health (and /metrics when public); never logged
    admin_api_key: str | None = None  # bearer token for changes to the steering library; None: the library is read-only
    data_dir: Path | None = None  # the steering library's directory (`functok_vllm.library.store`)
    metrics_public: bool = True  # /metrics answers without the API key (Prometheus scrapers rarely carry one)
    # Host header names (no port) requests may carry; None: any. `functok serve` bound to loopback defaults to the
    # loopback names, so that a web page cannot reach an unkeyed local server by DNS rebinding (`--allowed-hosts`).
    allowed_hosts: tuple[str, ...] | None = None
    monitors: tuple[str, ...] = ()  # `--monitor NAME=LAYER:FEATURE[:THRESHOLD]`, each (`server.monitors`)

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
        except (OSError, ValueError) as e:  # unreadable, not UTF-8, or not JSON
            raise CLIError(f"config file {p} is not valid JSON: {e}") from None
        if not isinstance(raw, dict) or set(raw) - {"limits", "presets"}:
            raise CLIError(f"config file {p}: expected an object with only 'limits' and 'presets'")
        limits = raw.get("limits", {})
        known = {f.name for f in limit_fields()}
        if not isinstance(limits, dict):
            raise CLIError(f"config file {p}: 'limits' must be an object")
        if set(limits) - known:
            raise CLIError(f"config file {p}: unknown limits {sorted(set(limits) - known)}; known: {sorted(known)}")
        presets = raw.get("presets", {})
        if not isinstance(presets, dict):
            raise CLIError(f"config file {p}: 'presets' must map names to steering objects")
        try:
            return cls.make(limits, presets)
        except CLIError as e:
            raise CLIError(f"config file {p}: {e}") from None

    @classmethod
    def make(cls, limits: dict, presets: dict | None = None) -> ServerConfig:
        """From one flat dict of limits, the server's and steering's (CLIError naming a bad one)."""
        steer = {f.name for f in fields(SteeringLimits)}
        try:
            steering = SteeringLimits(**{k: v for k, v in limits.items() if k in steer})
        except ValueError as e:
            raise CLIError(f"limits.{e}") from None
        return cls(Limits(**{k: v for k, v in limits.items() if k not in steer}), steering, presets or {})
