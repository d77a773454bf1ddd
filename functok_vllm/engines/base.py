"""The engine interface the server talks to: sampling parameters, requests, streamed deltas, the abstract Engine.

An engine runs one model with the steering core attached and streams each request's tokens as they are produced.
The transformers engine (`engines/hf`) implements it in-process; a vLLM AsyncLLM adapter implements the same methods.
Engines never see HTTP: the server validates the request body, builds a `GenerateRequest` and reads `Delta`s.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import NamedTuple

from functok_vllm.activation_capture import CaptureRequest, check_capture
from functok_vllm.core.spec import SpecError
from functok_vllm.feature_request import FeatureRequest, check_features
from functok_vllm.positions import check_position_request
from functok_vllm.readout_request import ReadoutRequest, check_readout
from functok_vllm.steering import SteeringContext, SteeringInfo, SteeringLimits, SteeringSpec, checked
from functok_vllm.stop_when import StopWhen

FINISH_REASONS = ("stop", "length", "abort", "error")
MAX_STOP_STRINGS = 16  # OpenAI allows 4; a few more cost nothing (each is one `str.find` per new text chunk)
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # alternatives per position, as OpenAI and vLLM's default max_logprobs
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


class RequestError(ValueError):
    """A request the engine cannot run as given; `param` names the offending field (the server answers HTTP 400)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(f"{param}: {message}")
        self.param, self.message, self.code = param, message, code


class EngineFull(RuntimeError):
    """Too many requests are running or queued; the server answers 429 with a Retry-After header."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(RuntimeError):
    """The engine is not running (not started yet, or shutting down); the server answers 503."""


@dataclass
class SamplingParams:
    temperature: float = 1.0  # OpenAI's default; 0 means greedy (argmax)
    top_p: float = 1.0
    max_tokens: int | None = None  # None: until the context is full
    stop: tuple[str, ...] = ()
    seed: int | None = None  # a per-request generator: the same seed gives the same tokens whatever the batch mates
    ignore_eos: bool = False  # keep generating past the end-of-sequence token (benchmarks, fixed-length runs)
    # vLLM's sampling extensions, with vLLM's meanings (penalties apply to the logits before temperature; top_k 0 or
    # -1 and min_p 0 are off; repetition_penalty counts prompt and output tokens, the other two output tokens only)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0  # the end-of-sequence token, stop_token_ids and stop strings cannot end it before this
    stop_token_ids: tuple[int, ...] = ()  # generating one ends the request ("stop")
    skip_special_tokens: bool = True  # in the text (token ids are always returned as generated)
    include_stop_str_in_output: bool = False  # keep the stop string, or the stop token's text, in the text

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            raise RequestError("temperature", f"{self.temperature!r} must be in [0, 2]")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError("top_p", f"{self.top_p!r} must be in (0, 1]")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise RequestError("max_tokens", f"{self.max_tokens!r} must be at least 0")
        if self.top_k < -1:
            raise RequestError("top_k", f"{self.top_k!r} must be at least 1 (0 or -1: off)")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise RequestError("min_p", f"{self.min_p!r} must be in [0, 1]")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 100):
            raise RequestError("repetition_penalty", f"{self.repetition_penalty!r} must be in (0, 100]")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2 <= v <= 2):
                raise RequestError(name, f"{v!r} must be in [-2, 2]")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise RequestError("min_tokens", f"{self.min_tokens!r} must be in [0, max_tokens]")
        self.stop_token_ids = tuple(self.stop_token_ids)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} are allowed")
        self.stop = tuple(self.stop)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError("stop", f"{len(self.stop)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(not s for s in self.stop):
            raise RequestError("stop", "stop strings must not be empty")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise RequestError("seed", f"{self.seed!r} is outside [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def filtered(self) -> bool:
        """Does sampling need more than temperature and top_p (top_k, min_p)?"""
        return self.top_k > 0 or self.min_p > 0


class TokenLogprob(NamedTuple):
    """One position's log-probabilities (log-softmax of the logits at temperature 1, of the steered model when the
    request is steered): the token's, and the `top` most likely tokens', most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass
class GenerateRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    steering: SteeringSpec | None = None  # checked against the engine's SAEs by `Engine.check_request`
    logprobs: int | None = None  # each generated token's log-probability and this many alternatives; None: none
    prompt_logprobs: int | None = None  # the same for every prompt token after the first; None: none
    features: FeatureRequest | None = None  # the SAE features that fired (Delta.features / prompt_features)
    capture: CaptureRequest | None = None  # raw residual activations (Delta.capture), `functok_vllm.activation_capture`
    readout: ReadoutRequest | None = None  # chosen features and vectors per position (Delta.readout)
    stop_when: StopWhen | None = None  # a monitor on one of `readout`'s series (`stop_when.py`)
    # a chat prompt's role code per token (`core.batch.narrowing`: content role | turn role << 2), for positions by role
    prompt_roles: list[int] | None = None
    # False: the consumer reads only the whole answer, so an engine may hand extras over with the last delta
    stream: bool = True


# A feature entry: {"token_id", "position", "layers": {"L": [[feature, activation], ...]}}, the features read at
# `position` (of prompt + completion); for a generated token, the position whose forward predicted it (the previous
# token's; the last prompt token's for the first), so every generated token has one.
FeatureEntry = dict


@dataclass
class Delta:
    """What one request produced since its previous delta; counts are running totals."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # one of FINISH_REASONS on the last delta, else None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Token positions (prompt and generated) where the engine actually applied this request's steering, each counted
    # once. Exact on the last delta; earlier deltas may say less (the vLLM engine reads it from its worker at the end).
    steered_positions: int = 0
    error: str | None = None  # set when finish_reason == "error"
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta: one per prompt token, the first None
    features: list[FeatureEntry] | None = None  # the next generated tokens' entries, in order (see FeatureEntry)
    prompt_features: list[FeatureEntry] | None = None  # first delta (or with the first features): every prompt token
    capture: bytes | None = None  # last delta of a request that asked: the safetensors blob (`capture.encode_capture`)
    # last delta of a request that asked: {"positions", "token_ids", "values"}, values[i] one float per series at
    # positions[i] (`readout_request.py`)
    readout: dict | None = None


class Engine(ABC):
    """One served model with steering. Async methods run on the server's event loop."""

    model_name: str
    max_model_len: int
    supports_capture: bool = False  # whether `GenerateRequest.capture` is served (else a RequestError names it)

    @property
    @abstractmethod
    def tokenizer(self):
        """A Hugging Face tokenizer (encode, decode, apply_chat_template)."""

    @abstractmethod
    def steering_info(self) -> SteeringInfo:
        """Fixed once the engine is built: engines compute it once (it is read twice per steered request)."""

    @property
    @abstractmethod
    def num_running(self) -> int:
        """Requests in the running batch."""

    @property
    @abstractmethod
    def num_waiting(self) -> int:
        """Requests accepted but not yet running."""

    @abstractmethod
    async def start(self) -> None:
        """Start the worker (and warm it up); called once before the first request."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop the worker; requests still running finish with finish_reason "abort"."""

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        """Stream the request's deltas; the last has a finish_reason.

        Raises RequestError (bad request), EngineFull (no room) or EngineStopped from the first `__anext__`, before
        any delta; a failure after that arrives as a last delta with finish_reason "error".
        Closing the iterator early aborts the request and frees its place in the batch.
        """

    # ---- shared helpers --------------------------------------------------------------------------------------------

    def is_healthy(self) -> bool:
        """False once the engine can no longer serve (its worker died); /health then answers 503."""
        return True

    def stats(self) -> dict[str, int]:
        """Engine counters for /metrics (e.g. prefills, decode_steps, decode_rows); {} when an engine keeps none."""
        return {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of the chat template applied to `messages`, ending with the assistant's turn to speak."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_request(self, r: GenerateRequest, running_ids, vocab_size: int, limits: SteeringLimits) -> None:
        """RequestError unless the request id is new, the prompt fits and its ids are in the vocabulary, and its
        steering (if any) can be applied. Both engines call this before admitting a request."""
        if r.request_id in running_ids:
            raise RequestError("request_id", f"{r.request_id!r} is already running")
        self.check_prompt(r.prompt_ids, r.sampling.max_tokens)
        bad = [t for t in r.prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        bad = [t for t in r.sampling.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError("stop_token_ids", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(r, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise RequestError(name, f"{n!r} must be between 0 and {MAX_LOGPROBS}")
        try:
            if r.steering is not None:  # parsed at the edge of this process already, or checked now (`checked`)
                r.steering = checked(r.steering, SteeringContext(self.steering_info(), limits))
                check_position_request(r.steering, "steering.positions", vocab_size, r.prompt_roles is not None)
            if r.prompt_roles is not None and len(r.prompt_roles) != len(r.prompt_ids):
                msg = f"{len(r.prompt_roles)} role codes for a prompt of {len(r.prompt_ids)} tokens"
                raise SpecError("prompt_roles", msg)
            if r.features is not None:
                check_features(r.features, self.steering_info())
            if r.readout is not None:
                check_readout(r.readout, self.steering_info())
            if r.stop_when is not None and not 0 <= r.stop_when.series < len(r.readout.probes if r.readout else ()):
                raise SpecError("stop_when", "its series must be one of the request's readout series (`series`)")
            if r.capture is not None:
                if not self.supports_capture:
                    msg = f"{type(self).__name__} does not capture activations; serve with the transformers engine"
                    raise SpecError("capture", msg)
                check_capture(r.capture, self.steering_info())
        except SpecError as e:
            raise RequestError(e.field, e.message) from None

    def check_prompt(self, prompt_ids: list[int], max_tokens: int | None, param: str = "prompt") -> None:
        """RequestError unless the prompt is non-empty and the prompt plus max_tokens fits in the context."""
        n = len(prompt_ids)
        if n == 0:
            raise RequestError(param, "the prompt is empty (it must hold at least one token)")
        if n >= self.max_model_len:
            raise RequestError(
                param,
                f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens "
                "and at least one must be left for the completion",
                code="context_length_exceeded",
            )
        if max_tokens is not None and n + max_tokens > self.max_model_len:
            raise RequestError(
                "max_tokens",
                f"{max_tokens} tokens requested after a prompt of {n} tokens, but this model's context is "
                f"{self.max_model_len} tokens (at most {self.max_model_len - n} are left)",
                code="context_length_exceeded",
            )
