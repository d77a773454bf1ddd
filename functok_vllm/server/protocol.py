"""The HTTP request bodies (pydantic) and their conversion to engine objects: SamplingParams, SteeringSpecs, features.

The request bodies forbid unknown keys, like our steering objects (`functok_vllm.steering`, which parses and checks
them), declare the OpenAI parameters (and vLLM's sampling extensions) and accept only the values this server
implements. No model accepts NaN or Infinity (Python's JSON parser reads those literals; pydantic refuses them here).
`steering` may be one spec or a list of them (one choice per entry, `None` for unsteered): `resolve_steering_list`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from functok_vllm.activation_capture import CaptureRequest, parse_capture
from functok_vllm.core.spec import SpecError
from functok_vllm.engines.base import MAX_LOGPROBS, RequestError, SamplingParams
from functok_vllm.feature_request import FeatureRequest, parse_features
from functok_vllm.readout_request import ReadoutRequest, parse_readout
from functok_vllm.server.config import Limits
from functok_vllm.server.openai_errors import APIError
from functok_vllm.steering import SteeringContext, SteeringInfo, SteeringSpec, Strict, parse_steering
from functok_vllm.stop_when import StopWhen, parse_stop_when
from functok_vllm.validation import shown

SpecGiven = dict[str, Any] | str | None  # a steering object, a preset name, or (in a list) None for unsteered


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
    n: int = Field(1, ge=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's sampling extensions, with its meanings
    top_k: int | None = Field(None, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False  # generate max_tokens tokens even past the end-of-sequence token
    return_token_ids: bool = False  # the token ids of each choice (and of the prompt with echo)
    # functok's extensions
    steering: SpecGiven | list[SpecGiven] = None  # one spec (or preset name), or a list of them: one choice each
    features: dict[str, Any] | None = None  # {"layers": [...], "top_k": K, "prompt": bool}: feature_request.py
    capture: dict[str, Any] | None = None  # {"layers", "positions", "dtype"}: activation_capture.py
    readout: dict[str, Any] | None = None  # {"features", "vectors", "pool", "prompt", "edits"}: readout_request.py
    stop_when: dict[str, Any] | None = (
        None  # {"feature" or "vector", "above"/"below", "tokens", "action"}: stop_when.py
    )
    vllm_xargs: dict[str, str | int | float | bool | list[str | int | float]] | None = None  # vLLM's scalar-only field

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
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt, or a batch: one choice (per spec, n) each
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for the legacy completions API; 0: score only
    echo: bool = False  # the prompt in front of the text (and its logprobs in front, the first null)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Literal[1] | None = None
    suffix: None = None

    def check(self) -> None:
        """APIError 400 naming the field for combinations pydantic cannot name."""
        if self.max_tokens == 0 and not self.echo:
            msg = "max_tokens: 0 generates nothing; it is allowed only with echo (prompt scoring)"
            raise APIError(400, msg, "max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """The batch: each entry a text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)) or not p:
            return [p]
        return list(p)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
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

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")

    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- conversion to engine objects ---------------------------------------------------------------------------------


def sampling_params(req: _Common, max_tokens: int | None, limits: Limits) -> SamplingParams:
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens: {max_tokens} exceeds this server's cap of {limits.max_tokens}", "max_tokens")
    try:
        return SamplingParams(
            req.temperature,
            req.top_p,
            max_tokens,
            req.stop_list(),
            req.seed,
            req.ignore_eos,
            top_k=req.top_k or 0,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            min_tokens=req.min_tokens,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
    except RequestError as e:
        raise APIError(400, str(e), e.param, e.code) from None


def capture_of(req: _Common, info: SteeringInfo) -> CaptureRequest | None:
    """The request's `capture`, checked against the steering layers; APIError 400 naming the field when it is bad."""
    try:
        return parse_capture(req.capture, info)
    except SpecError as e:
        raise APIError(400, f"{e.field}: {e.message}", e.field) from None


def readout_of(req: _Common, ctx: SteeringContext, max_series: int) -> ReadoutRequest | None:
    """The request's `readout`, checked against the SAEs and steering layers, its vectors resolved in the library;
    APIError 400 naming the field when it is bad."""
    try:
        return parse_readout(req.readout, ctx.info, ctx.lookup, max_series)
    except SpecError as e:
        raise APIError(400, f"{e.field}: {e.message}", e.field) from None


def stop_when_of(req: _Common, ctx: SteeringContext) -> StopWhen | None:
    """The request's `stop_when`, its series checked as a readout's; APIError 400 naming the field when it is bad."""
    try:
        return parse_stop_when(req.stop_when, ctx.info, ctx.lookup)
    except SpecError as e:
        raise APIError(400, f"{e.field}: {e.message}", e.field) from None


def features_of(req: _Common, info: SteeringInfo) -> FeatureRequest | None:
    """The request's `features`, checked against the loaded SAEs; APIError 400 naming the field when it is bad."""
    try:
        return parse_features(req.features, info)
    except SpecError as e:
        raise APIError(400, f"{e.field}: {e.message}", e.field) from None


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
            **self.spec.user_form(),
            "preset": self.preset,
            "source": self.source,
            "steered_positions": steered_positions,
        }


def resolve_steering_list(
    req: _Common, presets: dict[str, SteeringSpec], ctx: SteeringContext, max_specs: int
) -> list[Steering] | None:
    """Each entry of a list-valued `steering`, parsed and checked (`steering[i]...` names a bad one); None when
    `steering` is not a list (then `resolve_steering` reads it)."""
    if not isinstance(req.steering, list):
        return None
    if not req.steering:
        raise APIError(400, "steering: an empty list (give at least one entry; null is the unsteered one)", "steering")
    if len(req.steering) > max_specs:
        msg = f"steering: a list of {len(req.steering)} specs; this server answers at most {max_specs} choices"
        raise APIError(400, msg + " a request (max_choices)", "steering")
    if req.vllm_xargs and "steering" in req.vllm_xargs:
        raise APIError(400, "steering: given both as 'steering' and as 'vllm_xargs.steering'; give one", "steering")
    return [resolve_one(g, f"steering[{i}]", presets, ctx) for i, g in enumerate(req.steering)]


def resolve_steering(req: _Common, presets: dict[str, SteeringSpec], ctx: SteeringContext) -> Steering:
    """The request's steering from `steering` (object or preset name) or `vllm_xargs.steering` (JSON string or name),
    parsed and checked against what the engine has loaded; APIError 400 naming the field when it is bad."""
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
    return resolve_one(given, param, presets, ctx)


def resolve_one(given, param: str, presets: dict[str, SteeringSpec], ctx: SteeringContext) -> Steering:
    """One steering object (dict or JSON text), preset name or None, at `param`."""
    if given is None:
        return Steering(None)
    if isinstance(given, str) and not given.lstrip().startswith("{"):
        if given not in presets:
            have = ", ".join(sorted(presets)) or "none are configured"
            raise APIError(400, f"{param}: unknown preset {shown(given)} (presets: {have})", param, "unknown_preset")
        return Steering(presets[given], given, param)
    try:
        spec = parse_steering(given, param, ctx)  # checked, vector names resolved: now, once
    except SpecError as e:
        raise APIError(400, f"{e.field}: {e.message}", e.field) from None
    return Steering(spec, None, param if spec else None)
