"""POST /v1/analysis/reactivation: `analysis.reactivation.score_prompts` on the served model, off the event loop.

The HF engine's model must not run the analysis itself: it is switched to ragged attention (every forward needs its
rows' key/value buffers; without them attention outputs zeros) and, while the worker runs, carries the steering hooks,
which read per-forward state the worker writes. `analysis_view` builds a second module tree over the same parameter
tensors (no second copy of the weights) with the model's ordinary attention and none of those hooks, so the worker's
forwards and the analysis forwards share only read-only weights. Analysis jobs run one at a time on their own thread
(their capture hooks go on that shared view), behind a bounded queue (429 when full) and the request timeout (504).
Engines whose model is not in this process (vLLM) answer 501.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from pydantic import Field

from functok_vllm.analysis.model import HFAnalysisModel
from functok_vllm.engines.base import Engine
from functok_vllm.errors import CLIError
from functok_vllm.server.config import Limits
from functok_vllm.server.openai_errors import APIError
from functok_vllm.server.serving import timeout_error
from functok_vllm.steering import Strict, StrictInt

PATH = "/v1/analysis/reactivation"


class ReactivationRequest(Strict):
    model: str | None = None  # optional; when given it must be the served model
    prompts: list[str] = Field(min_length=1)
    layers: list[StrictInt] | None = Field(None, min_length=1)  # default: every layer with an SAE
    top_frac: float = Field(0.01, gt=0, le=1)  # "predictive": the next token is in the top top_frac of the logit lens
    detail: bool = True  # per-position feature lists for function-token positions


def analysis_view(model):
    """The model's modules again, sharing its parameters and buffers, with ordinary attention and no hooks."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, memo)
    for m in view.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    view.set_attn_implementation("sdpa" if getattr(model, "_supports_sdpa", False) else "eager")
    return view


@dataclass
class ServedAnalysisModel(HFAnalysisModel):
    """`HFAnalysisModel` whose prompts are bounded by the engine's context length (`--max-model-len`)."""

    context: int = 0

    @property
    def max_len(self) -> int:
        return self.context


def served_analysis_model(engine) -> ServedAnalysisModel:
    """The analysis model over the HF engine's weights, SAEs and function tokens."""
    ft = engine.function_tokens
    view = analysis_view(engine.model)
    mask = ft.mask(engine.vocab_size, device=view.device) if ft is not None else None
    return ServedAnalysisModel(view, engine.tokenizer, dict(engine.saes), mask, ft, context=engine.max_model_len)


class Analyzer:
    """Runs scoring jobs one at a time on a dedicated thread; at most 1 + limits.max_analysis_waiting at once."""

    def __init__(self, am, limits: Limits):
        self.am, self.limits = am, limits
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="functok-analysis")
        self.pending = 0
        self.lock = threading.Lock()

    def check(self, body: ReactivationRequest) -> tuple[int, ...] | None:
        """The layers to score; APIError (400) naming the first bad field."""
        n, cap = len(body.prompts), self.limits.max_analysis_prompts
        if n > cap:
            raise APIError(400, f"prompts: {n} prompts; at most {cap} are allowed per request", "prompts")
        layers = None
        if body.layers is not None:
            have = ", ".join(map(str, sorted(self.am.saes))) or "none"
            for i, layer in enumerate(body.layers):
                if layer not in self.am.saes:
                    raise APIError(400, f"layers[{i}]: no SAE at layer {layer} (layers with SAEs: {have})", "layers")
            if len(set(body.layers)) != len(body.layers):
                raise APIError(400, "layers: a layer is listed twice", "layers")
            layers = tuple(body.layers)
        for i, prompt in enumerate(body.prompts):
            ids = self.am.encode(prompt)
            if not ids:
                raise APIError(400, f"prompts[{i}]: the prompt is empty (it must hold at least one token)", "prompts")
            if len(ids) > self.am.max_len:
                msg = f"prompts[{i}]: the prompt has {len(ids)} tokens; this model's context is {self.am.max_len}"
                raise APIError(400, msg, "prompts", "context_length_exceeded")
        return layers

    async def run(self, body: ReactivationRequest, t0: float) -> list[dict]:
        from functok_vllm.analysis.reactivation import ReactivationConfig, score_prompts

        cfg = ReactivationConfig(self.check(body), body.top_frac, body.detail)
        with self.lock:
            if self.pending > self.limits.max_analysis_waiting:
                msg = f"the analysis queue is full ({self.pending} requests running or waiting)"
                raise APIError(429, msg, code="server_full", headers={"Retry-After": "1"})
            self.pending += 1
        job = self.pool.submit(score_prompts, self.am, list(body.prompts), cfg)
        job.add_done_callback(self._done)
        left = max(t0 + self.limits.request_timeout - time.monotonic(), 0)
        try:  # a timed-out job still waiting is dropped; one already running finishes on its thread, unread
            return await asyncio.wait_for(asyncio.wrap_future(job), left)
        except asyncio.TimeoutError:
            raise timeout_error(self.limits.request_timeout) from None
        except CLIError as e:  # `check` already refused what score_prompts refuses
            raise APIError(400, f"prompts: {e}", "prompts") from None

    def _done(self, _job) -> None:
        with self.lock:
            self.pending -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def add_analysis_route(app: FastAPI, engine: Engine, limits: Limits) -> Analyzer | None:
    """Register the route; the Analyzer it uses (None when this engine cannot run the analysis: the route says why)."""
    from functok_vllm.engines.hf.engine import HFEngine

    analyzer, why = None, None
    if not isinstance(engine, HFEngine):
        why = f"{PATH} needs the transformers engine (--engine hf); this server's model runs in vLLM's own processes"
    elif not engine.saes:
        why = f"{PATH} needs SAEs, and this server has none loaded (--sae)"
    else:
        analyzer = Analyzer(served_analysis_model(engine), limits)

    @app.post(PATH)
    async def reactivation(body: ReactivationRequest, request: Request):
        t0 = time.monotonic()
        request.state.steered = "false"
        if body.model is not None and body.model != engine.model_name:
            msg = f"model: {body.model!r} does not exist; this server serves {engine.model_name!r}"
            raise APIError(404, msg, "model", "model_not_found")
        if analyzer is None:
            raise APIError(501, why, code="not_implemented")
        results = await analyzer.run(body, t0)
        for r in results:
            r["layers"] = {str(layer): kinds for layer, kinds in r["layers"].items()}  # JSON object keys are strings
        layers = list(body.layers) if body.layers is not None else sorted(analyzer.am.saes)
        return {
            "object": "functok_vllm.analysis.reactivation",
            "model": engine.model_name,
            "layers": layers,
            "top_frac": body.top_frac,
            "results": results,
        }

    return analyzer
