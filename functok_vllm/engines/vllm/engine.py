"""The vLLM engine for `functok serve --engine vllm`: an AsyncLLM with the steering worker extension, as an `Engine`.

The server validates requests and builds `GenerateRequest`s exactly as for the transformers engine; this adapter
passes the spec to vLLM as `extra_args["steering"]` (JSON, as a client of `vllm serve` sends it), streams
`RequestOutputKind.DELTA` outputs as `Delta`s, and counts each request's steered positions on the CPU with the
core's `build_slot_index` (the worker applies the same selection; vLLM has no channel to report per-request counts).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from functok_vllm.core import POLICY_CODES, FunctionTokens, SteeringSpec, StepIndex, build_slot_index
from functok_vllm.core.batch import last_function_position
from functok_vllm.engines.base import Delta, Engine, EngineFull, GenerateRequest, RequestError, SteeringInfo
from functok_vllm.engines.vllm.config import (
    CONFIG_KEY,
    EXTENSION,
    XARG,
    from_additional_config,
    to_xarg,
)

log = logging.getLogger("functok.engine")
FINISH = {"stop": "stop", "length": "length", "abort": "abort"}  # anything else vLLM reports becomes "error"


@dataclass
class VLLMEngineConfig:
    model: Path
    saes: list[Path] = field(default_factory=list)
    function_tokens: Path | None = None  # required when any SAE is loaded
    served_model_name: str | None = None
    max_model_len: int | None = None
    max_running: int = 32  # vLLM's max_num_seqs
    max_waiting: int = 128  # requests accepted beyond that; more get EngineFull (HTTP 429)
    max_edits: int = 16
    max_clamps: int = 64
    dtype: str = "float32"
    enforce_eager: bool = False
    engine_args: dict = field(default_factory=dict)  # any other AsyncEngineArgs (block_size, enable_prefix_caching...)

    def __post_init__(self):
        self.model = Path(self.model)
        self.saes = [Path(p) for p in self.saes]
        if self.saes and self.function_tokens is None:
            raise ValueError("SAEs are loaded but no function-token file was given")

    def additional_config(self) -> dict:
        if not self.saes:
            return {}
        raw = {"saes": [str(p) for p in self.saes], "function_tokens": str(self.function_tokens)}
        return {CONFIG_KEY: raw | {"max_edits": self.max_edits, "max_clamps": max(self.max_clamps, self.max_edits)}}


class VLLMEngine(Engine):
    def __init__(self, cfg: VLLMEngineConfig):
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg
        self.model_name = cfg.served_model_name or cfg.model.name
        mc = AutoConfig.from_pretrained(str(cfg.model))
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.vocab_size = mc.vocab_size
        self._tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
        self.steer_cfg = from_additional_config(cfg.additional_config()) if cfg.saes else None
        self.function_tokens = FunctionTokens.load(self.steer_cfg.function_tokens) if self.steer_cfg else None
        self.fn_mask = self.function_tokens.mask(self.vocab_size) if self.function_tokens else None
        self.llm = None
        self._inflight: set[str] = set()

    # ---- Engine interface -------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def num_running(self) -> int:
        return min(len(self._inflight), self.cfg.max_running)

    @property
    def num_waiting(self) -> int:
        return max(len(self._inflight) - self.cfg.max_running, 0)

    def is_healthy(self) -> bool:
        return self.llm is None or not self.llm.errored

    @functools.cached_property
    def _steering_info(self) -> SteeringInfo:
        return SteeringInfo.build(self.steer_cfg.sae_meta if self.steer_cfg else {}, self.function_tokens)

    def steering_info(self) -> SteeringInfo:
        return self._steering_info

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.cfg
        args = dict(
            model=str(c.model),
            served_model_name=self.model_name,
            dtype=c.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=c.max_running,
            enforce_eager=c.enforce_eager,
            seed=0,
            worker_extension_cls=EXTENSION if c.saes else "",
            additional_config=c.additional_config(),
        )
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**(args | c.engine_args)))

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        self.check_request(request, self._inflight, self.vocab_size, self.cfg.max_edits)
        if len(self._inflight) >= self.cfg.max_running + self.cfg.max_waiting:
            raise EngineFull(
                f"the server is full ({self.num_running} requests running, {self.num_waiting} waiting)", retry_after=1
            )
        p, ids, spec = request.sampling, list(request.prompt_ids), request.steering
        n = len(ids)
        params = VSamplingParams(
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=min(p.max_tokens or self.max_model_len, self.max_model_len - n),
            stop=list(p.stop) or None,
            seed=p.seed,
            output_kind=RequestOutputKind.DELTA,
            extra_args={XARG: to_xarg(spec)} if spec is not None else None,
        )
        counter = SteeredCounter(spec, ids, self.fn_mask)
        out_ids: list[int] = []
        self._inflight.add(request.request_id)
        finished = False
        try:
            async for out in self.llm.generate({"prompt_token_ids": ids}, params, request.request_id):
                c = out.outputs[0]
                out_ids += c.token_ids
                finished = out.finished
                reason = FINISH.get(c.finish_reason, "error") if finished else None
                error = f"vLLM finished the request with {c.finish_reason!r}" if reason == "error" else None
                yield Delta(c.text, list(c.token_ids), reason, n, len(out_ids), counter.upto(out_ids), error)
        except VLLMValidationError as e:  # vLLM refused the request before running it
            raise RequestError(e.parameter or "request", str(e)) from None
        except Exception as e:  # the engine died or failed mid-request: an ending the client can read, not a cut
            if finished:
                raise
            log.exception("vLLM failed request %s", request.request_id)
            finished = True  # nothing left to abort
            error = f"the vLLM engine failed: {type(e).__name__}"
            yield Delta("", [], "error", n, len(out_ids), counter.upto(out_ids), error)
        finally:
            self._inflight.discard(request.request_id)
            if not finished and self.llm is not None:
                try:
                    await self.llm.abort(request.request_id)
                except Exception:  # the engine is shutting down or dead: nothing left to abort
                    log.debug("abort of %s failed", request.request_id, exc_info=True)


class SteeredCounter:
    """Positions where a request's steering applies among the tokens forwarded so far (prompt + all but the newest
    generated token), computed with the core's `build_slot_index`, incrementally."""

    def __init__(self, spec: SteeringSpec | None, prompt_ids: list[int], fn_mask: torch.Tensor | None):
        self.spec, self.prompt, self.fn_mask = spec, prompt_ids, fn_mask
        self.done, self.count = 0, 0
        if spec is not None and fn_mask is not None:
            self.policy = POLICY_CODES[spec.positions]
            self.last_fn = last_function_position(prompt_ids, fn_mask)

    def upto(self, out_ids: list[int]) -> int:
        if self.spec is None or self.fn_mask is None or not out_ids:
            return 0
        end = len(self.prompt) + len(out_ids) - 1  # the newest token has not been through the model
        if end > self.done:
            p = len(self.prompt)
            seq = self.prompt[self.done : end] + out_ids[max(self.done - p, 0) : end - p]  # no copy of the whole
            k = len(seq)
            one = lambda v: torch.tensor([v])  # noqa: E731
            step = StepIndex(
                torch.tensor(seq),
                torch.arange(self.done, end),
                torch.zeros(k, dtype=torch.long),
                one(1),
                one(self.policy),
                one(len(self.prompt)),
                one(self.last_fn),
            )
            self.count += int(build_slot_index(step, self.fn_mask).count_nonzero())
            self.done = end
        return self.count
