"""The HTTP request bodies (pydantic) and their conversion to engine objects: SamplingParams and a SteeringSpec.

The request bodies forbid unknown keys, like our steering objects (`functok_vllm.steering`, which parses and checks
them), declare the OpenAI parameters and accept only the values this server implements. No model accepts NaN or
Infinity (Python's JSON parser reads those literals; pydantic refuses them here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from functok_vllm.core.spec import SpecError, SteeringSpec
from functok_vllm.engines.base import RequestError, SamplingParams
from functok_vllm.server.config import Limits
from functok_vllm.server.errors import APIError
from functok_vllm.steering import SteeringInfo, SteeringLimits, Strict, api_form, check_steering, parse_steering
from functok_vllm.validation import shown


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


def resolve_steering(
    req: _Common, presets: dict[str, SteeringSpec], limits: SteeringLimits, info: SteeringInfo, vectors=None
) -> Steering:
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
    if given is None:
        return Steering(None)
    if isinstance(given, str) and not given.lstrip().startswith("{"):
        if given not in presets:
            have = ", ".join(sorted(presets)) or "none are configured"
            raise APIError(400, f"{param}: unknown preset {shown(given)} (presets: {have})", param, "unknown_preset")
        return Steering(presets[given], given, param)
    try:
        spec = parse_steering(given, param, limits, vectors)  # vector names resolved now, once
        if spec is not None:
            check_steering(spec, info, limits, param)
    except SpecError as e:
        raise APIError(400, f"{e.field}: {e.message}", e.field) from None
    return Steering(spec, None, param if spec else None)
