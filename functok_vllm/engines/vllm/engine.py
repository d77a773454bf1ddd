"""The vLLM engine for `functok serve --engine vllm`: an AsyncLLM with the steering worker extension, as an `Engine`.

The server validates requests and builds `GenerateRequest`s exactly as for the transformers engine; this adapter
passes the spec to vLLM as `extra_args["steering"]` (JSON, as a client of `vllm serve` sends it) and streams
`RequestOutputKind.DELTA` outputs as `Delta`s.

Steering is never claimed unless applied. A request with clamp/ablate edits WAITS (as in the transformers engine)
until `ClampBudget` admits it: the budget never grants more clamp columns at a layer than the worker's pool holds, so
the worker's table never refuses an admitted request (`SlotsFull`); slots always suffice (`max_num_seqs + 1`).
A request that could never fit is refused (RequestError, HTTP 400). `steered_positions` is what the worker applied:
read from it (`collective_rpc("functok_applied")`) when the request ends, so only the last delta carries it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from functok_vllm.core import FunctionTokens, SteeringSpec
from functok_vllm.engines.base import Delta, Engine, EngineFull, EngineStopped, GenerateRequest, RequestError
from functok_vllm.engines.vllm.batch_state import TAG
from functok_vllm.engines.vllm.config import CONFIG_KEY, EXTENSION, XARG, from_additional_config, vector_payload
from functok_vllm.steering import SteeringInfo, SteeringLimits, to_json

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
    steering: SteeringLimits = field(default_factory=SteeringLimits)  # also the worker's, through additional_config
    steer_layers: list[int] = field(default_factory=list)  # add-only layers (no SAE) where vectors go, at resid_post
    dtype: str = "float32"
    enforce_eager: bool = False
    engine_args: dict = field(default_factory=dict)  # any other AsyncEngineArgs (block_size, enable_prefix_caching...)

    def __post_init__(self):
        self.model = Path(self.model)
        self.saes = [Path(p) for p in self.saes]
        if (self.saes or self.steer_layers) and self.function_tokens is None:
            raise ValueError("steering layers are set but no function-token file was given")

    def additional_config(self) -> dict:
        if not (self.saes or self.steer_layers):
            return {}
        raw = {"saes": [str(p) for p in self.saes], "function_tokens": str(self.function_tokens)}
        raw |= {"steer_layers": sorted(self.steer_layers)} if self.steer_layers else {}
        return {CONFIG_KEY: raw | asdict(self.steering)}


class ClampBudget:
    """Clamp/ablate columns per layer that admitted requests hold, never more than `capacity` (the worker's pool).

    Each request counts its own columns although equal specs share them in the worker, so this never admits more than
    fits. First come, first served: a request waits until every earlier waiting one has been admitted.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used: Counter[int] = Counter()
        self.queue: deque[tuple[Counter, asyncio.Future]] = deque()
        self.closed = False

    @staticmethod
    def need(spec: SteeringSpec | None) -> Counter:
        """layer -> clamp columns the spec takes there (what `SteeringTable.acquire` takes for it)."""
        return Counter(e.layer for e in spec.edits if e.mode != "add") if spec is not None else Counter()

    def check(self, need: Counter) -> None:
        """RequestError if the request could never be admitted."""
        for layer, n in sorted(need.items()):
            if n > self.capacity:
                raise RequestError(
                    "steering.edits",
                    f"{n} clamp/ablate edits at layer {layer}, but this engine's clamp pool holds {self.capacity} "
                    "a layer (max_clamps), so the request could never run",
                )

    def _fits(self, need: Counter) -> bool:
        return all(self.used[layer] + n <= self.capacity for layer, n in need.items())

    async def acquire(self, need: Counter) -> None:
        """Take `need`'s columns, waiting for earlier requests and for room; EngineStopped if closed meanwhile."""
        if self.closed:
            raise EngineStopped("the engine is shutting down")
        if not self.queue and self._fits(need):
            self.used.update(need)
            return
        entry = (need, asyncio.get_running_loop().create_future())
        self.queue.append(entry)
        try:
            await entry[1]
        except BaseException:  # cancelled (timeout, client gone) or closed: give back whatever was granted
            fut = entry[1]
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(need)
            elif entry in self.queue:
                self.queue.remove(entry)
                self._grant()
            raise

    def release(self, need: Counter) -> None:
        self.used.subtract(need)
        self._grant()

    def close(self) -> None:
        """Fail every waiting request with EngineStopped; no more are admitted."""
        self.closed = True
        while self.queue:
            _, fut = self.queue.popleft()
            if not fut.done():
                fut.set_exception(EngineStopped("the engine is shutting down"))

    def _grant(self) -> None:
        while self.queue and self._fits(self.queue[0][0]):
            need, fut = self.queue.popleft()
            if not fut.done():
                self.used.update(need)
                fut.set_result(None)

    @property
    def waiting(self) -> int:
        return len(self.queue)


class VLLMEngine(Engine):
    def __init__(self, cfg: VLLMEngineConfig):
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg
        self.model_name = cfg.served_model_name or cfg.model.name
        mc = AutoConfig.from_pretrained(str(cfg.model))
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.vocab_size = mc.vocab_size
        self._tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
        self.d_model = mc.hidden_size
        self.steer_cfg = from_additional_config(cfg.additional_config()) if cfg.additional_config() else None
        for layer in cfg.steer_layers:
            if not 0 <= layer < mc.num_hidden_layers:
                raise ValueError(f"--steer-layers {layer}: the model has decoder layers 0-{mc.num_hidden_layers - 1}")
        self.function_tokens = FunctionTokens.load(self.steer_cfg.function_tokens) if self.steer_cfg else None
        if self.function_tokens is not None:
            self.function_tokens.mask(self.vocab_size)  # ids outside the vocabulary: refused now, not in the worker
        self.llm = None
        self.budget: ClampBudget | None = None
        self._stopped = False
        self._inflight: set[str] = set()

    # ---- Engine interface -------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def _admitted(self) -> int:
        return len(self._inflight) - (self.budget.waiting if self.budget else 0)

    @property
    def num_running(self) -> int:
        return min(self._admitted, self.cfg.max_running)

    @property
    def num_waiting(self) -> int:
        return len(self._inflight) - self.num_running

    def is_healthy(self) -> bool:
        return self.llm is not None and not self._stopped and not self.llm.errored

    @functools.cached_property
    def _steering_info(self) -> SteeringInfo:
        if self.steer_cfg is None:
            return SteeringInfo.build({}, None, (), self.d_model)
        sc = self.steer_cfg
        return SteeringInfo.build(sc.sae_configs, self.function_tokens, sc.steer_layers, self.d_model)

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
            worker_extension_cls=EXTENSION if self.steer_cfg else "",
            additional_config=c.additional_config(),
        )
        args |= c.engine_args
        if self.steer_cfg:  # the pool the worker allocates (install_steering), from the config it is given
            worker = from_additional_config(args["additional_config"], str(c.model))
            self.budget = ClampBudget(worker.limits.max_clamps)
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    async def shutdown(self) -> None:
        """Requests still running or waiting end with finish_reason "abort"; later ones get EngineStopped."""
        self._stopped = True
        if self.budget is not None:
            self.budget.close()
        if self.llm is not None:
            if self._inflight:
                try:
                    await self.llm.abort(list(self._inflight))  # each gets a final "abort" output
                except Exception:
                    log.debug("abort at shutdown failed", exc_info=True)
            self.llm.shutdown()
            self.llm = None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        if self.llm is None or self._stopped:
            raise EngineStopped("the engine is not running (not started, or shutting down)")
        self.check_request(request, self._inflight, self.vocab_size, self.cfg.steering)
        need = ClampBudget.need(request.steering) if self.budget is not None else Counter()
        if need:
            self.budget.check(need)
        if len(self._inflight) >= self.cfg.max_running + self.cfg.max_waiting:
            raise EngineFull(
                f"the server is full ({self.num_running} requests running, {self.num_waiting} waiting)", retry_after=1
            )
        p, ids, spec, rid = request.sampling, list(request.prompt_ids), request.steering, request.request_id
        n = len(ids)
        params = VSamplingParams(
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=min(p.max_tokens or self.max_model_len, self.max_model_len - n),
            stop=list(p.stop) or None,
            seed=p.seed,
            ignore_eos=p.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args={XARG: to_json(spec), TAG: rid} | vector_payload(spec) if spec is not None else None,
        )
        completion = 0
        self._inflight.add(rid)
        held = submitted = finished = False
        try:
            if need:
                await self.budget.acquire(need)  # waits while the clamp pool is taken
                held = True
            submitted = True
            async for out in self.llm.generate({"prompt_token_ids": ids}, params, rid):
                c = out.outputs[0]
                completion += len(c.token_ids)
                finished = out.finished
                reason = FINISH.get(c.finish_reason, "error") if finished else None
                error = f"vLLM finished the request with {c.finish_reason!r}" if reason == "error" else None
                steered = await self._applied(rid) if finished and spec is not None else 0
                yield Delta(c.text, list(c.token_ids), reason, n, completion, steered, error)
        except EngineStopped:  # shut down while it waited for the clamp pool: an abort, as for a queued request
            finished = True
            yield Delta("", [], "abort", n, 0, 0)
        except VLLMValidationError as e:  # vLLM refused the request before running it
            raise RequestError(e.parameter or "request", str(e)) from None
        except Exception as e:  # the engine died or failed mid-request: an ending the client can read, not a cut
            if finished:
                raise
            finished = True  # nothing left to abort
            if self._stopped:
                yield Delta("", [], "abort", n, completion, 0)
                return
            log.exception("vLLM failed request %s", rid)
            yield Delta("", [], "error", n, completion, 0, f"the vLLM engine failed: {type(e).__name__}")
        finally:
            if submitted and not finished and self.llm is not None:
                try:
                    await self.llm.abort(rid)  # before the budget is released: the worker frees its columns first
                except Exception:  # the engine is shutting down or dead: nothing left to abort
                    log.debug("abort of %s failed", rid, exc_info=True)
            self._inflight.discard(rid)
            if held:
                self.budget.release(need)

    async def _applied(self, rid: str) -> int:
        """Positions where the worker steered the request (0, logged, when it cannot say: never a guess)."""
        if self._stopped or self.llm is None:
            return 0
        try:
            got = await self.llm.collective_rpc("functok_applied", args=(rid,))
        except Exception:
            log.warning("could not read the applied steering of request %s; reporting 0", rid, exc_info=True)
            return 0
        counts = [g for g in got if g is not None]
        if not counts:
            log.warning("the worker has no record of steering request %s; reporting 0 steered positions", rid)
        return max(counts, default=0)  # pipeline parallel: the ranks holding the steered layers
