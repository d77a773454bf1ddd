"""The transformers engine: a Hugging Face model, its SAEs and function tokens, served with dynamic batching.

`HFEngine` is the asyncio face of `Batcher` (the worker thread that runs the model): it validates requests, enforces
the running/queued limits, and hands each request's deltas from the worker to the event loop through an asyncio
queue (`loop.call_soon_threadsafe`). The steering core's `SteeringLayer`s are attached through `residual_hooks` for
the worker's lifetime and removed when it stops.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from functok_vllm.core import FunctionTokens, SAELoadError, SteeringTable
from functok_vllm.core.sae import add_only_points, load_saes
from functok_vllm.engines.base import Delta, Engine, EngineFull, EngineStopped, GenerateRequest, SamplingParams
from functok_vllm.engines.hf.batcher import Batcher, Seq
from functok_vllm.engines.hf.hooks import check_hook_points, load_model
from functok_vllm.engines.hf.ragged import RaggedAttention
from functok_vllm.engines.hf.textout import TextStream
from functok_vllm.engines.placement import decoder_layers
from functok_vllm.steering import SteeringInfo, SteeringLimits, SteeringSpec

log = logging.getLogger("functok.engine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HFEngineConfig:
    model: Path
    saes: list[Path] = field(default_factory=list)
    function_tokens: Path | None = None  # required when any SAE is loaded
    served_model_name: str | None = None  # default: the model directory's name
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_running: int = 32  # requests decoded together in one forward
    max_waiting: int = 128  # requests queued beyond that; more get EngineFull (HTTP 429)
    steering: SteeringLimits = field(default_factory=SteeringLimits)  # edits, clamp columns, strength
    steer_layers: list[int] = field(default_factory=list)  # add-only layers (no SAE) where vectors go, at resid_post
    threads: int = 2
    dtype: str = "float32"
    device: str = "cpu"
    # The decode batch is padded with filler rows to a multiple of this. MKL/oneDNN's sgemm sums in a different
    # order for 1-3 rows, and with 2+ threads for a row tail of 1-3 past a multiple of 4 (5-7, 9-11 rows), so a
    # request's logits would differ in the last bits between running alone and in some batch sizes. Measured on
    # this project's CPUs: every multiple of 4 from 4 to 200 rows gives each row bit-identical results (1-8 threads).
    decode_row_multiple: int = 4
    warmup: bool = True  # run two tiny requests at start so the first user request does not pay for kernel JIT

    def __post_init__(self):
        self.model = Path(self.model)
        self.saes = [Path(p) for p in self.saes]
        if self.function_tokens is not None:
            self.function_tokens = Path(self.function_tokens)
        for name in ("max_running", "threads", "decode_row_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be at least 0, got {self.max_waiting}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


class HFEngine(Engine):
    supports_capture = True  # the batcher copies capturing requests' rows out in its hooks (`batcher.py`)

    def __init__(self, cfg: HFEngineConfig):
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        dtype = DTYPES[cfg.dtype]
        self.model, self._tokenizer = load_model(cfg.model, dtype=dtype, device=cfg.device)
        mc = self.model.config
        n_layers = len(decoder_layers(self.model))
        self.saes = load_saes(cfg.saes, mc.hidden_size, n_layers, cfg.device, dtype)
        check_hook_points(self.model, [sae.cfg.hook for sae in self.saes.values()])  # before attention is switched
        self.ragged = RaggedAttention(self.model)  # UnsupportedModel (a ValueError) for a family it cannot serve
        self.model_name = cfg.served_model_name or cfg.model.name
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.vocab_size = mc.vocab_size
        try:
            self.add_layers = add_only_points(cfg.steer_layers, {k: sae.cfg for k, sae in self.saes.items()}, n_layers)
        except ValueError as e:
            raise ValueError(f"--steer-layers {e}") from None
        self.function_tokens = None
        fn_mask, table = None, None
        if self.saes or self.add_layers:
            if cfg.function_tokens is None:
                raise SAELoadError("steering layers are set but no function-token file was given")
            if not cfg.function_tokens.is_file():
                raise SAELoadError(f"{cfg.function_tokens}: function-token file does not exist")
            self.function_tokens = FunctionTokens.load(cfg.function_tokens)
            fn_mask = self.function_tokens.mask(self.vocab_size, device=cfg.device)
            table = SteeringTable(
                self.saes,
                max_slots=cfg.max_running + 1,  # distinct specs of a full batch always fit; row 0 is "no steering"
                max_clamps=cfg.steering.max_clamps,
                max_projections=cfg.steering.max_projections,
                max_conditions=cfg.steering.max_condition_columns,
                max_tokens=self.max_model_len,
                dtype=dtype,
                device=cfg.device,
                add_layers=self.add_layers,
                d_model=mc.hidden_size,
            )
        eos = self.model.generation_config.eos_token_id
        eos_ids = {*(eos if isinstance(eos, list) else [eos]), self._tokenizer.eos_token_id} - {None}
        self.batcher = Batcher(
            self.model, self.ragged, self._tokenizer, table, fn_mask, cfg.max_running, cfg.decode_row_multiple, eos_ids
        )
        self._inflight: set[str] = set()
        self._outbox: Outbox | None = None

    # ---- Engine interface -------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def num_running(self) -> int:
        return len(self.batcher.running)

    @property
    def num_waiting(self) -> int:
        return max(len(self._inflight) - self.num_running, 0)

    def stats(self) -> dict[str, int]:
        return dict(self.batcher.stats)

    def is_healthy(self) -> bool:
        return self.batcher.alive

    @functools.cached_property
    def _steering_info(self) -> SteeringInfo:
        configs = {layer: sae.cfg for layer, sae in self.saes.items()}
        return SteeringInfo.build(configs, self.function_tokens, self.add_layers, self.model.config.hidden_size)

    def steering_info(self) -> SteeringInfo:
        return self._steering_info

    async def start(self) -> None:
        self.batcher.thread.start()
        if self.cfg.warmup:
            prompt = self.encode("The warmup prompt, with a comma.")
            steer = None
            if self.saes:
                layer = next(iter(self.saes))
                steer = SteeringSpec.from_dict({"edits": [{"layer": layer, "feature": 0, "strength": 1.0}]})
            for spec in (None, steer):
                req = GenerateRequest(f"warmup-{uuid.uuid4().hex}", prompt, SamplingParams(0, max_tokens=2), spec)
                async for _ in self.generate(req):
                    pass

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.batcher.stop)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        self.check_request(request, self._inflight, self.vocab_size, self.cfg.steering)
        if not self.batcher.alive:
            raise EngineStopped("the engine is not running (not started, or shutting down)")
        if len(self._inflight) >= self.cfg.max_running + self.cfg.max_waiting:
            raise EngineFull(
                f"the server is full ({self.num_running} requests running, {self.num_waiting} waiting)", retry_after=1
            )
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = Outbox(loop)
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        p = request.sampling
        cap = self.max_model_len if p.max_tokens is None else p.max_tokens
        seq = Seq(
            req=request,
            emit=functools.partial(self._outbox.put, deltas),
            max_new=min(cap, self.max_model_len - len(request.prompt_ids)),
            text=TextStream(
                self._tokenizer, p.stop, request.prompt_ids, p.skip_special_tokens, p.include_stop_str_in_output
            ),
            generator=None if p.greedy else torch.Generator(self.cfg.device).manual_seed(_seed(p.seed)),
            stops=frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.batcher.eos_ids),
        )
        self._inflight.add(request.request_id)
        finished = False
        try:
            self.batcher.submit(seq)
            while not finished:
                d = await deltas.get()
                finished = d.finish_reason is not None
                yield d
        finally:
            self._inflight.discard(request.request_id)
            if not finished:
                self.batcher.abort(request.request_id)


class Outbox:
    """Deltas from the worker thread to the event loop, one wake-up for all that arrive before the loop runs.

    A decode step of 16 requests yields 16 deltas; scheduling each with its own `call_soon_threadsafe` would wake the
    loop 16 times per step and make the two threads fight over the GIL.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, Delta]] = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, d: Delta) -> None:  # the worker thread
        with self.lock:
            self.items.append((queue, d))
            if len(self.items) > 1:
                return  # a drain is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _drain(self) -> None:  # the event loop
        with self.lock:
            items, self.items = self.items, []
        for queue, d in items:
            queue.put_nowait(d)


def _seed(seed: int | None) -> int:
    return random.getrandbits(63) if seed is None else seed % (1 << 64)
