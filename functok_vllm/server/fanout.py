"""From a validated request to running choices: one engine request per (prompt, steering spec, sample), all started
together so the engine decodes them in one batch, under the server's limits on choices and feature output.

Every choice's engine request is admitted before the response starts: if any is refused (a bad prompt, a full
server, the deadline), the ones already admitted are aborted and the whole request gets that one error.
"""

from __future__ import annotations

import asyncio

from functok_vllm.engines.base import Engine, EngineFull, EngineStopped, GenerateRequest, RequestError
from functok_vllm.feature_request import FeatureRequest
from functok_vllm.server.choices import Choice, Prompt, choice_seed
from functok_vllm.server.config import Limits
from functok_vllm.server.metrics import Metrics
from functok_vllm.server.openai_errors import APIError
from functok_vllm.server.protocol import Steering, sampling_params
from functok_vllm.server.serving import next_delta, timeout_error


def plan(prompts: list[Prompt], steerings: list[Steering], n: int, limits: Limits, listed: bool) -> list[Choice]:
    """The choices in response order: prompt-major, then spec, then sample (`choices[i].index == i`)."""
    total = len(prompts) * len(steerings) * n
    if total > limits.max_choices:
        param = "n" if n > 1 else ("steering" if listed else "prompt")
        msg = (
            f"{param}: {len(prompts)} prompts x {len(steerings)} steering specs x n={n} make {total} choices; this "
            f"server answers at most {limits.max_choices} a request (max_choices)"
        )
        raise APIError(400, msg, param)
    out = []
    for p in prompts:
        for s in steerings:
            for _ in range(n):
                out.append(Choice(len(out), p, s))
    return out


def check_features(fr: FeatureRequest | None, choices: list[Choice], max_tokens: list[int], limits: Limits) -> None:
    """400 naming `features` when the activations asked for exceed `max_feature_values`."""
    if fr is None:
        return
    prompt_of = {id(c.prompt): i for i, c in enumerate({id(c.prompt): c for c in choices}.values())}
    total = 0
    for c in choices:
        i = prompt_of[id(c.prompt)]
        total += fr.values(max_tokens[i] + (len(c.prompt.ids) if fr.prompt else 0))
    if total > limits.max_feature_values:
        msg = (
            f"features: {total} activations asked for (choices x positions x {len(fr.layers)} layers x top_k "
            f"{fr.top_k}); this server returns at most {limits.max_feature_values} a request (max_feature_values)"
        )
        raise APIError(400, msg, "features")


def check_capture(cap, choices: list[Choice], max_tokens: list[int], limits: Limits, d_model: int) -> None:
    """413 naming `capture` when the activations it may return exceed `max_capture_bytes`, checked before any work
    starts on the most the request can compute (every choice's prompt and max_tokens - 1 generated tokens)."""
    if cap is None:
        return
    prompt_of = {id(c.prompt): i for i, c in enumerate({id(c.prompt): c for c in choices}.values())}
    total = sum(
        cap.max_bytes(len(c.prompt.ids) + max(max_tokens[prompt_of[id(c.prompt)]] - 1, 0), d_model) for c in choices
    )
    if total > limits.max_capture_bytes:
        msg = (
            f"capture: up to {total} bytes of activations (choices x positions x {len(cap.layers)} layers x d_model "
            f"{d_model} x {cap.dtype}); this server returns at most {limits.max_capture_bytes} a request "
            "(max_capture_bytes): ask for fewer positions, layers or max_tokens, or float16"
        )
        raise APIError(413, msg, "capture", "capture_too_large")


def check_prompt_scoring(prompt_lp: int | None, choices: list[Choice], limits: Limits) -> None:
    """400 naming `logprobs` when prompt scoring (echo) asks for more values than `max_prompt_logprob_values`:
    checked before any work starts, since each choice scores its whole prompt."""
    if prompt_lp is None:
        return
    total = sum(len(c.prompt.ids) for c in choices) * (prompt_lp + 1)
    if total > limits.max_prompt_logprob_values:
        msg = (
            f"logprobs: echo scores {total} values (prompt tokens of every choice x (logprobs + 1)); this server "
            f"scores at most {limits.max_prompt_logprob_values} a request (max_prompt_logprob_values)"
        )
        raise APIError(400, msg, "logprobs")


async def start(
    engine: Engine,
    body,
    choices: list[Choice],
    max_tokens: list[int],
    request_id: str,
    extras: dict,
    limits: Limits,
    metrics: Metrics,
    t0: float,
) -> None:
    """Submit every choice's engine request and read its first delta (into `choice.first`). `max_tokens[i]` is the
    i-th distinct prompt's; `extras`: GenerateRequest's logprobs, prompt_logprobs, features."""
    cap = limits.max_running + limits.max_waiting
    if len(choices) > 1 and engine.num_running + engine.num_waiting + len(choices) > cap:
        busy = f"{engine.num_running} requests running, {engine.num_waiting} waiting"
        msg = f"the server is full for {len(choices)} choices ({busy})"
        raise APIError(429, msg, code="server_full", headers={"Retry-After": "1"})
    index = {}
    for c in choices:
        index.setdefault(id(c.prompt), len(index))
    for c in choices:
        j = c.index % body.n
        params = sampling_params(body, max_tokens[index[id(c.prompt)]], limits)
        params.seed = choice_seed(body.seed, j)
        rid = request_id if len(choices) == 1 else f"{request_id}-{c.index}"
        spec = c.steering.spec
        roles = c.prompt.roles if spec is not None and spec.roles else None
        req = GenerateRequest(rid, c.prompt.ids, params, spec, stream=bool(body.stream), prompt_roles=roles, **extras)
        c.deltas = engine.generate(req)
    deadline = t0 + limits.request_timeout
    firsts = await asyncio.gather(*(next_delta(c.deltas, deadline) for c in choices), return_exceptions=True)
    failed = [e for e in firsts if isinstance(e, BaseException)]
    if not failed:
        for c, d in zip(choices, firsts, strict=True):
            c.first = d
        return
    for c in choices:
        await c.deltas.aclose()  # aborts the admitted ones
    e = failed[0]
    steered = str(any(c.steering.spec is not None for c in choices)).lower()
    if isinstance(e, asyncio.TimeoutError):
        metrics.finished.labels("timeout", steered).inc()
        raise timeout_error(limits.request_timeout) from None
    if isinstance(e, RequestError):
        raise APIError(400, str(e), e.param, e.code) from None
    if isinstance(e, EngineFull):
        raise APIError(429, str(e), code="server_full", headers={"Retry-After": str(e.retry_after)}) from None
    if isinstance(e, EngineStopped):
        raise APIError(503, str(e), code="engine_stopped") from None
    raise e
