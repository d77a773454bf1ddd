"""The vLLM engine for `functok serve --engine vllm`: an AsyncLLM with the steering worker extension, as an `Engine`.

The server validates requests and builds `GenerateRequest`s exactly as for the transformers engine; this adapter
passes the parsed spec object to vLLM as `extra_args["steering"]` (the admission hook, in this same process, turns
it into its wire form without parsing it again) and streams `RequestOutputKind.DELTA` outputs as `Delta`s.

Steering is never claimed unless applied. A request with clamp/ablate or projection edits WAITS (as in the
transformers engine) until `ClampBudget` admits it: it never grants more columns at a layer than the worker's pool
holds, so the worker's table never refuses an admitted request (`SlotsFull`); slots always suffice (`max_num_seqs + 1`).
A request that could never fit is refused (RequestError, HTTP 400). `steered_positions` is what the worker applied:
read from it (`collective_rpc("functok_applied")`) when the request ends, so only the last delta carries it.

Log-probabilities are vLLM's own (`outputs.py`). Features are read out on the workers (`feature_op.py`) and fetched with
`collective_rpc("functok_features")`: per delta when the consumer streams (one RPC shared by the requests asking at
that moment), else once when the request ends; this is what `functok serve --engine vllm` adds to stock vLLM. A
`readout`'s values and a `capture`'s rows ride the same side channel (`series_op.py`), fetched once when the request
ends (`functok_readout`, `functok_request_capture`); the capture blob is formed here, as the transformers engine's.
A `stop_when` with action "stop" reads its series per delta instead (`functok_monitor`, one RPC shared as features'):
a delta is handed on only once its values are checked; at the trigger it is cut after the trigger token, the request
is aborted in vLLM, and what the workers read past it is dropped from the readout, features and capture.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from functok_vllm.activation_capture import CaptureRequest, encode_capture, select_rows
from functok_vllm.core import FunctionTokens
from functok_vllm.core.sae import add_only_points
from functok_vllm.engines.base import Delta, Engine, EngineFull, EngineStopped, GenerateRequest, RequestError
from functok_vllm.engines.vllm.batch_state import ROLES_XARG, TAG
from functok_vllm.engines.vllm.budget import ClampBudget
from functok_vllm.engines.vllm.feature_op import XFEAT
from functok_vllm.engines.vllm.outputs import (
    FeatureReader,
    MonitorReader,
    cut_text,
    entries,
    logprobs_of,
    merge_series,
    prompt_logprobs_of,
    vllm_sampling,
)
from functok_vllm.engines.vllm.series_op import XCAPTURE, XREAD
from functok_vllm.engines.vllm.settings import CONFIG_KEY, EXTENSION, XARG, from_additional_config
from functok_vllm.steering import SteeringInfo, SteeringLimits

__all__ = ["ClampBudget", "VLLMEngine", "VLLMEngineConfig"]

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
    tensor_parallel_size: int = 1  # vLLM's own parallelism (the mp backend on one node; Ray across nodes)
    pipeline_parallel_size: int = 1
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


class VLLMEngine(Engine):
    supports_capture = True  # after the edits only: the workers copy capturing requests' rows out (`series_op.py`)

    def __init__(self, cfg: VLLMEngineConfig):
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg
        self.model_name = cfg.served_model_name or cfg.model.name
        mc = AutoConfig.from_pretrained(str(cfg.model))
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.vocab_size = mc.vocab_size
        self._tokenizer = AutoTokenizer.from_pretrained(str(cfg.model))
        self.d_model = mc.hidden_size
        extra = cfg.additional_config()
        self.steer_cfg = from_additional_config(extra) if extra else None
        try:  # the range now, in this process, rather than as a worker's start-up failure
            add_only_points(cfg.steer_layers, {}, mc.num_hidden_layers)
        except ValueError as e:
            raise ValueError(f"--steer-layers {e}") from None
        self.function_tokens = FunctionTokens.load(self.steer_cfg.function_tokens) if self.steer_cfg else None
        self.fn_mask = None  # (vocab,) bool: which ids are function tokens (capture's function positions)
        if self.function_tokens is not None:
            self.fn_mask = self.function_tokens.mask(self.vocab_size)  # ids outside the vocabulary: refused now
        self.llm = None
        self.reader: FeatureReader | None = None
        self.monitor: MonitorReader | None = None
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
            tensor_parallel_size=c.tensor_parallel_size,
            pipeline_parallel_size=c.pipeline_parallel_size,
        )
        if c.tensor_parallel_size * c.pipeline_parallel_size > 1:
            args["distributed_executor_backend"] = "mp"  # one node; FUNCTOK_VLLM_ARGS may name "ray" for several
        args |= c.engine_args
        if args.get("logprobs_mode", "raw_logprobs") != "raw_logprobs":
            raise ValueError("logprobs_mode: functok reports log-softmax of the raw logits; leave it raw_logprobs")
        if self.steer_cfg:  # the pool the worker allocates (install_steering), from the config it is given
            worker = from_additional_config(args["additional_config"], str(c.model))
            self.budget = ClampBudget(
                worker.limits.max_clamps, worker.limits.max_projections, worker.limits.max_condition_columns
            )
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        self.reader = FeatureReader(self.llm)
        self.monitor = MonitorReader(self.llm)

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
        from vllm.exceptions import VLLMValidationError

        if self.llm is None or self._stopped:
            raise EngineStopped("the engine is not running (not started, or shutting down)")
        self.check_request(request, self._inflight, self.vocab_size, self.cfg.steering)
        reads, capture = request.readout, request.capture
        watch = request.stop_when if request.stop_when is not None and request.stop_when.action == "stop" else None
        if watch is not None and capture is not None and capture.positions == "last":
            msg = "the worker keeps only its latest row, which may lie past the token a 'stop' monitor ends at"
            raise RequestError("capture.positions", msg)
        need = ClampBudget.need(request.steering) if self.budget is not None else Counter()
        if need:
            self.budget.check(need)
        if len(self._inflight) >= self.cfg.max_running + self.cfg.max_waiting:
            raise EngineFull(
                f"the server is full ({self.num_running} requests running, {self.num_waiting} waiting)", retry_after=1
            )
        p, ids, spec, rid = request.sampling, list(request.prompt_ids), request.steering, request.request_id
        fr = request.features
        n = len(ids)
        score_only = p.max_tokens == 0  # vLLM generates at least one token: it is dropped here
        cap = self.max_model_len if p.max_tokens is None else p.max_tokens
        extra = {TAG: rid} if any(x is not None for x in (spec, fr, reads, capture)) else {}
        if spec is not None:  # the spec object parsed at this process's edge: admission turns it into its wire form
            extra[XARG] = spec
            if spec.roles:  # the chat prompt's role codes the server computed, for the worker's narrowing
                extra[ROLES_XARG] = list(request.prompt_roles)
        if fr is not None:
            extra[XFEAT] = fr.to_dict()
        if reads is not None:
            extra[XREAD] = reads.to_dict()
        if capture is not None:
            extra[XCAPTURE] = capture.to_dict()
        params = vllm_sampling(request, min(cap, self.max_model_len - n), extra or None)
        out_ids: list[int] = []
        sent_text = ""  # the text handed on so far
        tail: list[float] = []  # a "stop" monitor's latest values (fewer than it needs in a row: not triggered yet)
        cut = None  # the first position past a "stop" monitor's trigger
        feat_sent = 0  # generated tokens whose feature entries have been read
        self._inflight.add(rid)
        held = submitted = finished = False
        stream = None
        try:
            if need:
                await self.budget.acquire(need)  # waits while the column pools are taken
                held = True
            submitted = True
            first = True
            stream = self.llm.generate({"prompt_token_ids": ids}, params, rid)
            async for out in stream:
                c = out.outputs[0]
                toks, text = ([], "") if score_only else (list(c.token_ids), c.text)
                finished = out.finished
                reason = FINISH.get(c.finish_reason, "error") if finished else None
                reason = "length" if score_only and reason == "stop" else reason
                error = f"vLLM finished the request with {c.finish_reason!r}" if reason == "error" else None
                lps = [] if score_only else c.logprobs
                if watch is not None and toks and reason != "error":  # held back until its values are checked
                    at = await self.monitor.hit(rid, watch, n - 1 + len(out_ids), len(toks), tail)
                    if isinstance(at, str):  # its values could not be read: fail it, never guess
                        await self._abort(rid)
                        finished = False  # so that `finally` drops what the workers hold of it
                        yield Delta("", [], "error", n, len(out_ids), 0, at)
                        return
                    if at is not None:  # the monitor triggered at toks[at]: the last token the client gets
                        log.info("stop_when stopped %s at token %d (a delta of %d)", rid, len(out_ids) + at, len(toks))
                        if at + 1 < len(toks):
                            text = cut_text(self._tokenizer, out_ids, toks[: at + 1], sent_text, p.skip_special_tokens)
                            toks, lps = toks[: at + 1], None if lps is None else lps[: at + 1]
                        if not finished:
                            finished = True
                            await self._abort(rid)  # out of the batch now; its values stay for the reads below
                        reason, cut = "stop", n + len(out_ids) + at  # positions read from here on are dropped
                sent_text += text
                steered = await self._applied(rid) if finished and spec is not None else 0
                d = Delta(text, toks, reason, n, len(out_ids) + len(toks), steered, error)  # counts are totals
                d.logprobs = logprobs_of(toks, lps, request.logprobs)
                if first:
                    d.prompt_logprobs = prompt_logprobs_of(ids, out.prompt_logprobs, request.prompt_logprobs)
                out_ids += toks
                if fr is not None and (request.stream or finished) and reason != "error":  # (cut: then finished)
                    got = await self.reader.take(rid, len(out_ids), fr.prompt)
                    rows = got.get("generated", [])  # entries of the tokens from feat_sent on
                    d.features = entries(out_ids[feat_sent:], n - 1 + feat_sent, rows, fr.layers)
                    feat_sent += len(rows)
                    if "prompt" in got:
                        d.prompt_features = entries(ids, 0, got["prompt"], fr.layers)
                if reads is not None and reason in ("stop", "length"):
                    d.readout = await self._readout(rid, ids + out_ids, cut)
                if capture is not None and reason in ("stop", "length"):
                    d.capture = await self._capture(rid, capture, ids + out_ids, cut)
                first = False
                yield d
                if cut is not None:
                    if fr is not None:
                        await self.reader.drop(rid)  # what the worker read past the trigger
                    break
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
                yield Delta("", [], "abort", n, len(out_ids), 0)
                return
            log.exception("vLLM failed request %s", rid)
            yield Delta("", [], "error", n, len(out_ids), 0, f"the vLLM engine failed: {type(e).__name__}")
        finally:
            if stream is not None:
                try:
                    await stream.aclose()  # a no-op once it has ended
                except Exception:  # the engine is dead: nothing left to close
                    log.debug("closing the output stream of %s failed", rid, exc_info=True)
            if submitted and not finished and self.llm is not None:
                try:
                    await self.llm.abort(rid)  # before the budget is released: the worker frees its columns first
                except Exception:  # the engine is shutting down or dead: nothing left to abort
                    log.debug("abort of %s failed", rid, exc_info=True)
                if fr is not None:
                    await self.reader.drop(rid)
                for kind, asked in (("functok_readout_drop", reads), ("functok_request_capture_drop", capture)):
                    if asked is not None:
                        try:
                            await self.llm.collective_rpc(kind, args=(rid,))
                        except Exception:
                            log.debug("%s of %s failed", kind, rid, exc_info=True)
            self._inflight.discard(rid)
            if held:
                self.budget.release(need)

    async def _abort(self, rid: str) -> None:
        try:
            await self.llm.abort(rid)
        except Exception:  # the engine is shutting down or dead: nothing left to abort
            log.debug("abort of %s failed", rid, exc_info=True)

    async def _readout(self, rid: str, ids: list[int], cut: int | None = None) -> dict | None:
        """The finished request's readout from the workers: {"positions", "token_ids", "values"} (positions below
        `cut` when given); None (logged) when no worker can say."""
        try:
            got = merge_series(await self.llm.collective_rpc("functok_readout", args=(rid,)))
        except Exception:
            log.warning("could not read the readout of request %s", rid, exc_info=True)
            return None
        if got is None:
            log.warning("no worker read the readout of request %s", rid)
            return None
        if cut is not None:
            k = sum(p < cut for p in got["positions"])
            got = {"positions": got["positions"][:k], "values": got["values"][:k]}
        return got | {"token_ids": [ids[p] for p in got["positions"]]}

    async def _capture(self, rid: str, cap: CaptureRequest, ids: list[int], cut: int | None = None) -> bytes | None:
        """The finished request's capture blob, as the transformers engine's (`activation_capture.encode_capture`),
        from the rows the workers copied (positions below `cut` when given); None (logged) when no worker can say."""
        try:
            parts = [g for g in await self.llm.collective_rpc("functok_request_capture", args=(rid,)) if g]
        except Exception:
            log.warning("could not read the capture of request %s", rid, exc_info=True)
            return None
        if not parts:
            log.warning("no worker captured request %s", rid)
            return None
        rows = {}
        for g in parts:  # pipeline parallel: each rank holds its layers; tensor parallel: every rank the same
            rows |= {L: t for L, t in g["rows"].items() if g["positions"] == parts[0]["positions"]}
        every = torch.tensor(parts[0]["positions"], dtype=torch.long)  # (rows read,)
        keep = every < (cut if cut is not None else len(ids))  # (rows read,) none past a monitor's trigger
        positions = every[keep]  # (rows,)
        token_ids = torch.tensor(ids, dtype=torch.long)[positions]  # (rows,)
        pick = torch.arange(len(positions))  # all, last: the worker kept only what is returned
        if cap.positions in ("function", "last_function"):
            pick = select_rows(cap, token_ids, self.fn_mask)
        hooks = {layer: hook for hook, layer in self.steering_info().hook_layers.items()}
        tensors = {}
        for L in cap.layers:
            got = torch.frombuffer(bytearray(rows[L]), dtype=torch.float32).reshape(len(every), self.d_model)
            tensors[hooks[L]] = got[keep][pick]  # (rows, d_model)
        return encode_capture(tensors, positions[pick], token_ids[pick], cap.dtype)

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
