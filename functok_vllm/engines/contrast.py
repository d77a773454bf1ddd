"""Steering vectors from contrastive examples (CAA): the mean difference of activations between positive and negative
prompts at chosen layers, read on the serving engine through per-request capture, unsteered.

Each prompt is one engine request with `max_tokens` 0 and a `capture` of its layers (`activation_capture.py`), so the
activations come from the engine's own forward (the same hook points, batching and dtype that later steer with the
vector), with no edit applied. The read position per prompt:

- `last`: the last prompt token;
- `last_function`: the last function token of the prompt (the paper's position: where steering at the last function
  token adds the vector); a prompt without one is refused;
- `mean`: the mean over every prompt position.

`mean_diff` is mean(positive) - mean(negative) per layer (with pairs, the mean of the paired differences: the same
number). `pca` (pairs only) is the first principal direction of the paired differences, uncentered as llama.cpp's
`cvector-generator` computes it (the top right singular vector of the (pairs, d_model) differences), signed so the
differences project positively on it and scaled to their mean projection, so its size is comparable to mean_diff's.
Sums are in float64; the result is float32.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from functok_vllm.activation_capture import CaptureRequest, read_capture
from functok_vllm.engines.base import Engine, EngineStopped, GenerateRequest, RequestError, SamplingParams

READ_POSITIONS = {"last": "last", "last_function": "last_function", "mean": "all"}  # -> capture positions
METHODS = ("mean_diff", "pca")
CONCURRENCY = 8  # prompts in flight at once: a batch's worth, leaving the server room for its other requests


@dataclass(frozen=True)
class Examples:
    positive: list[list[int]]  # token ids of each positive prompt
    negative: list[list[int]]
    layers: tuple[int, ...]
    position: str = "last_function"
    method: str = "mean_diff"
    paired: bool = True  # positive[i] and negative[i] are a pair


async def read_activations(
    engine: Engine, prompts: list[list[int]], ex: Examples, param: str, progress: Callable[[int], None] | None = None
) -> dict[int, torch.Tensor]:
    """{layer: (prompts, d_model) float64} activations at each prompt's read position; RequestError naming
    `{param}[i]` for a prompt without a function token at `last_function`."""
    cap = CaptureRequest(ex.layers, READ_POSITIONS[ex.position], "float32")
    gate = asyncio.Semaphore(CONCURRENCY)
    sampling = SamplingParams(temperature=0, max_tokens=0)

    async def one(i: int, ids: list[int]) -> dict[str, torch.Tensor]:
        async with gate:
            req = GenerateRequest(f"contrast-{uuid.uuid4().hex}", ids, sampling, capture=cap, stream=False)
            last = None
            async for d in engine.generate(req):
                last = d
        if last.capture is None:  # aborted (shutting down) or failed: no vector from part of the examples
            raise EngineStopped(f"{param}[{i}]: the engine ended it with {last.error or last.finish_reason}")
        got = read_capture(last.capture)
        if got["positions"].shape[0] == 0:
            raise RequestError(f"{param}[{i}]", "the prompt has no function token, so no 'last_function' position")
        if progress is not None:
            progress(1)
        return got

    caps = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
    hook_of = {layer: hook for hook, layer in engine.steering_info().hook_layers.items()}
    return {layer: torch.stack([c[hook_of[layer]].double().mean(0) for c in caps]) for layer in ex.layers}


def mean_difference(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(n, d), (m, d) float64 -> (d,) mean(pos) - mean(neg)."""
    return pos.mean(0) - neg.mean(0)


def first_component(diffs: torch.Tensor) -> torch.Tensor:
    """(pairs, d) float64 differences -> (d,) their top uncentered principal direction, signed toward the positives
    and scaled to the mean projection of the differences on it."""
    v = torch.linalg.svd(diffs, full_matrices=False).Vh[0]  # (d,) unit
    proj = float((diffs @ v).mean())
    return v * proj  # a negative mean projection flips the sign, so the result points from negatives to positives


async def contrast_vector(
    engine: Engine, ex: Examples, progress: Callable[[int], None] | None = None
) -> dict[int, torch.Tensor]:
    """{layer: (d_model,) float32 direction} from the examples, computed on `engine` (RequestError where it cannot)."""
    if not engine.supports_capture:
        raise RequestError(
            "examples",
            f"{type(engine).__name__} does not capture activations, which vectors from "
            "examples are computed from; compute it on a transformers-engine server and upload it",
        )
    pos = await read_activations(engine, ex.positive, ex, "examples.positive", progress)
    neg = await read_activations(engine, ex.negative, ex, "examples.negative", progress)
    out = {}
    for layer in ex.layers:
        if ex.method == "pca":
            out[layer] = first_component(pos[layer] - neg[layer]).float()
        else:
            out[layer] = mean_difference(pos[layer], neg[layer]).float()
    return out
