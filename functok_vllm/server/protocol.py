"""The HTTP request bodies (pydantic) and their conversion to engine objects: SamplingParams and a SteeringSpec.

Our own steering objects forbid unknown keys (a misspelt `strenght` is an error, not a silent no-op); so do the
request bodies, which declare the OpenAI parameters and accept only the values this server implements. No model
accepts NaN or Infinity (Python's JSON parser reads those literals; pydantic refuses them here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from functok_vllm.core.spec import MODES, POSITIONS, SpecError, SteeringSpec
from functok_vllm.engines.base import RequestError, SamplingParams
from functok_vllm.server.config import Limits
from functok_vllm.server.errors import APIError, from_validation, shown

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]  # strict floats take JSON ints too, but never strings or bools


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EditIn(Strict):
    layer: StrictInt
    feature: StrictInt
    mode: Literal[MODES] = "add"
    strength: StrictFloat | None = None  # add: residual += strength * W_dec[feature]
    value: StrictFloat | None = None  # clamp: the feature's activation is set to value; ablate: to 0

    @model_validator(mode="after")
    def _fields_fit_mode(self):
        need = {"add": "strength", "clamp": "value", "ablate": None}[self.mode]
        for name in ("strength", "value"):
            given = getattr(self, name) is not None
            if name == need and not given:
                raise ValueError(f"mode {self.mode!r} needs '{name}'")
            if name != need and given:
                raise ValueError(f"mode {self.mode!r} takes no '{name}'" + (f" (it takes '{need}')" if need else ""))
        return self


class SteeringIn(Strict):
    edits: list[EditIn] = []
    positions: Literal[POSITIONS] = "function"


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Common(Strict):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    steering: dict[str, Any] | str | None = None  # a steering object, or the name of a preset
    vllm_xargs: dict[str, str | int | float | bool | list[str | int | float]] | None = None  # vLLM's scalar-only field
    return_token_ids: bool = False  # vLLM extension: the generated token ids in each choice
    ignore_eos: bool = False  # vLLM extension: generate max_tokens tokens even past the end-of-sequence token

    @model_validator(mode="after")
    def _check(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self

    def stop_list(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for the legacy completions API
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompt_text_or_ids(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise APIError(400, f"prompt: a batch of {len(p)} prompts; send one prompt per request", "prompt")
            return p[0]
        return p


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    response_format: dict[str, Any] | None = None
    tools: list | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format: only {'type': 'text'} is supported")
        if self.tools:
            raise ValueError("tools are not supported")
        return self

    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- conversion to engine objects ---------------------------------------------------------------------------------


def sampling_params(req: _Common, max_tokens: int | None, limits: Limits) -> SamplingParams:
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens: {max_tokens} exceeds this server's cap of {limits.max_tokens}", "max_tokens")
    try:
        return SamplingParams(req.temperature, req.top_p, max_tokens, req.stop_list(), req.seed, req.ignore_eos)
    except RequestError as e:
        raise APIError(400, str(e), e.param, e.code) from None


def api_form(spec: SteeringSpec) -> dict:
    """A spec as a request's steering object (without the field its mode does not use), so it can be sent back."""
    used = {"add": ("strength",), "clamp": ("value",), "ablate": ()}
    edits = [
        {"layer": e.layer, "feature": e.feature, "mode": e.mode} | {k: getattr(e, k) for k in used[e.mode]}
        for e in spec.edits
    ]
    return {"edits": edits, "positions": spec.positions}


@dataclass
class Steering:
    """What the server applies to one request, and reports back in the response's `steering` field."""

    spec: SteeringSpec | None
    preset: str | None = None
    source: str | None = None  # "steering" or "vllm_xargs.steering"

    def report(self, steered_positions: int) -> dict | None:
        if self.spec is None:
            return None
        return {
            **api_form(self.spec),
            "preset": self.preset,
            "source": self.source,
            "steered_positions": steered_positions,
        }


def parse_steering(obj: dict, param: str, limits: Limits) -> SteeringSpec | None:
    """A steering object (already JSON-decoded) -> SteeringSpec; APIError naming `param...` when it is bad."""
    try:
        s = SteeringIn.model_validate(obj)
    except ValidationError as e:
        raise from_validation(e.errors(), tuple(param.split("."))) from None
    if len(s.edits) > limits.max_edits:
        raise APIError(400, f"{param}.edits: {len(s.edits)} edits; at most {limits.max_edits} are allowed", param)
    for i, e in enumerate(s.edits):
        for name in ("strength", "value"):
            v = getattr(e, name)
            if v is not None and abs(v) > limits.max_abs_strength:
                where = f"{param}.edits[{i}].{name}"
                raise APIError(400, f"{where}: {v!r} exceeds the limit of {limits.max_abs_strength:g}", where)
    if not s.edits:
        return None
    try:
        return SteeringSpec.from_dict(s.model_dump(exclude_none=True))
    except SpecError as e:
        raise APIError(400, f"{param}.{e.field}: {e.message}", f"{param}.{e.field}") from None


def resolve_steering(req: _Common, presets: dict[str, SteeringSpec], limits: Limits) -> Steering:
    """The request's steering from `steering` (object or preset name) or `vllm_xargs.steering` (JSON string or name)."""
    xargs = req.vllm_xargs or {}
    unknown = sorted(set(xargs) - {"steering"})
    if unknown:
        raise APIError(400, f"vllm_xargs: unknown key {unknown[0]!r} (this server reads only 'steering')", "vllm_xargs")
    given, param = req.steering, "steering"
    if "steering" in xargs:
        if given is not None:
            raise APIError(400, "steering: given both as 'steering' and as 'vllm_xargs.steering'; give one", "steering")
        given, param = xargs["steering"], "vllm_xargs.steering"
        if not isinstance(given, str):
            raise APIError(400, f"{param}: must be a JSON string or a preset name, got {shown(given)}", param)
        if given.lstrip().startswith("{"):
            given = _json_object(given, param)
    if given is None:
        return Steering(None)
    if isinstance(given, str):
        if given not in presets:
            have = ", ".join(sorted(presets)) or "none are configured"
            raise APIError(400, f"{param}: unknown preset {shown(given)} (presets: {have})", param, "unknown_preset")
        return Steering(presets[given], given, param)
    spec = parse_steering(given, param, limits)
    return Steering(spec, None, param if spec else None)


def _json_object(text: str, param: str) -> dict:
    def no_constants(name):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        obj = json.loads(text, parse_constant=no_constants)
    except ValueError as e:
        raise APIError(400, f"{param}: not a valid JSON object ({e})", param) from None
    if not isinstance(obj, dict):
        raise APIError(400, f"{param}: must be a JSON object, got {shown(obj)}", param)
    return obj
