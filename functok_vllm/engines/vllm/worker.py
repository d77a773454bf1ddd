"""The vLLM worker extension: puts the steering core into the model before it is compiled, and fills it every step.

Use: `LLM(..., worker_extension_cls=EXTENSION)` or `vllm serve ... --worker-extension-cls EXTENSION`, where
EXTENSION = "functok_vllm.engines.vllm.worker.SteeringWorkerExtension"; settings come from
`additional_config["functok"]` (see `settings.py`).

How it gets in. vLLM appends the extension class to the worker's bases and refuses extensions that redefine a worker
attribute, so the extension defines none: it only intercepts the worker's `self.model_runner = ...` assignment with
a property, and swaps the new runner's class for a subclass that mixes in `SteeringRunnerMixin` (V1 model runner,
which vLLM 0.32 uses on CPU: there is no Triton). The mixin overrides three runner methods:

- `load_model`: after the weights are loaded, and before vLLM warms up or compiles anything, the module at each SAE's
  hook point (`engines.placement.target`: a decoder layer, its attention/MLP module, layer 0, the fused norm after
  attention), and each `steer_layers` decoder layer (an add-only layer for steering vectors, no SAE), gets the core's
  `SteeringLayer` as a submodule and a hook placed by `engines.placement` (the same placement as the transformers
  engine's) that calls `steer_and_read`: the steering op, then the feature readout op (`feature_op.py`, which does
  nothing unless a request of the step asked for `features`). Dynamo traces hooks present when it traces the model,
  so the compiled graph contains both ops, which read the table's buffers: graph inputs updated in place.
- `execute_model`: new requests' metadata is cached (`BatchSteering.add_request`; a steering vector's directions
  come with the request, `extra_args["functok_vectors"]`, never from a file), finished ones are released.
- `_model_forward` (vLLM's documented override point): `BatchSteering.prepare` writes the per-token slot index
  (and `count_applied` after the forward counts where the edits acted),
  `FeatureReadout.prepare` plans the step's feature readout (only while some request asks), and in capture mode
  (`functok_capture_begin` / `functok_capture_save`, offline analysis, see `capture_session.py`) the step's token
  ids are handed to the capture hooks.

Capture-only engines (`additional_config.functok.capture_only`, what `functok analyze coverage --engine vllm` starts):
`load_model` loads each SAE's encoder alone, in `sae_dtype` (`capture_saes`), and installs no steering; the API
process refuses steering and feature requests on them (`admission.py`).

Layer outputs. A vLLM decoder layer returns `(hidden_states, residual)`; the residual stream after the layer is their
sum, which the next layer's fused add+norm (or the final norm) forms. The hook makes a steered layer return
`(hidden_states + delta(h), residual)`: the next add gives h + delta, the transformers engine's hooked output.

Tensor parallel: the residual stream is replicated on every rank, and every rank holds the same SAEs and tables and
sees the same scheduler output, so each applies the same update (untested here). Pipeline parallel: a rank steers
only the layers it holds. Compile caches: vLLM's cache keys ignore the worker extension, so before compiling we add a
fingerprint of the steering setup to the worker's `additional_config`, which they do hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from functok_vllm.core import FunctionTokens, SteeringTable
from functok_vllm.core import condition as core_condition
from functok_vllm.core import steer as core_steer
from functok_vllm.core.sae import SAE, add_only_points, load_saes
from functok_vllm.core.vector import decode_payloads
from functok_vllm.engines import placement
from functok_vllm.engines.vllm import compat
from functok_vllm.engines.vllm import feature_op as feature_readout
from functok_vllm.engines.vllm.batch_state import TAG, BatchSteering
from functok_vllm.engines.vllm.capture_session import RunnerCapture
from functok_vllm.engines.vllm.feature_op import READOUT_KEY, FeatureReadout
from functok_vllm.engines.vllm.settings import VECTORS, XARG, FunctokConfig, from_additional_config
from functok_vllm.steering import SteeringContext, SteeringSpec, parse_steering

log = logging.getLogger("functok.vllm")
GRAPH_KEY = "functok_graph"  # additional_config key holding the steering fingerprint (worker process only)


def steer_and_read(mod: torch.nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The hook callback (`engines.placement.StreamFn`) at every steering layer: THE ADD of the vLLM path, the core's
    opaque op `functok::steered_hidden` (hidden + delta(hidden + residual); `core/steer.py` says why it must be opaque
    to Inductor), then the feature readout op on what it was given and what it leaves (`feature_op.py`: readouts and
    captures before or after this layer's edits, in one op). `mod` is the hooked module, which holds the layer's
    tables (`functok_steer`, a submodule: its buffers are the graph's inputs, updated in place)."""
    out = mod.functok_steer.steered_hidden(hidden, residual)  # never aliases `hidden`: both stay readable
    torch.ops.functok.read_features(hidden, out, residual, mod.functok_marker, mod.functok_layer, READOUT_KEY)
    return out


class SteeringRunnerMixin:
    """Mixed into the V1 model runner's class (see the module docstring)."""

    functok: BatchSteering | None = None
    functok_readout: FeatureReadout | None = None
    functok_capture: RunnerCapture | None = None  # a capture session (offline analysis), see capture.py
    functok_capture_saes: dict[int, SAE] | None = None  # capture-only engines: {layer: encoder-only SAE}
    functok_step_tokens = 0

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        cfg = from_additional_config(self.vllm_config.additional_config, self.model_config.model)
        if cfg.capture_only:
            self.functok_capture_saes = capture_saes(self, cfg)
            return
        self.functok = install_steering(self, cfg)
        if self.functok is not None:
            saes = {L: op.sae for L, op in self.functok.table.layers.items() if op.sae is not None}
            self.functok_readout = FeatureReadout(saes, self.device, self.functok.table.layers)
            compat.register_forward_state(self.vllm_config, READOUT_KEY, self.functok_readout)

    def execute_model(self, scheduler_output, *args, **kwargs):
        st, ro = self.functok, self.functok_readout
        self.functok_step_tokens = compat.step_tokens(scheduler_output)
        if st is not None:
            done = compat.finished_ids(scheduler_output)
            st.finish(done)
            ro.finish(done)
            st.resumed += compat.resumed_count(scheduler_output)
            for req_id, prompt_ids, extra, cached in compat.new_requests(scheduler_output):
                st.add_request(req_id, prompt_ids, extra, cached)
                if prompt_ids is not None:
                    ro.add_request(req_id, len(prompt_ids), extra, str((extra or {}).get(TAG, req_id)))
        return super().execute_model(scheduler_output, *args, **kwargs)

    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        st, ro = self.functok, self.functok_readout
        ids = input_ids if input_ids is not None else compat.input_ids(self)
        if st is not None:
            if positions is None:  # no positions to select by: this forward runs unsteered
                st.clear()
            else:
                pos = positions if positions.dim() == 1 else positions[0]  # M-RoPE (3, tokens): row 0 is the text
                st.prepare(compat.batch_rows(self), ids[: pos.shape[0]], pos, compat.query_start_loc(self))
                if ro.meta or ro.series.meta or ro.capture.meta:  # host-side plans: features, series, captures
                    ro.prepare(compat.batch_rows(self), *compat.row_starts_and_qsl(self))
        cap = self.functok_capture
        try:
            if cap is not None:
                cap.ids = ids[: self.functok_step_tokens]  # (tokens,) the rows the capture hooks read
                pos = positions if positions is None or positions.dim() == 1 else positions[0]
                cap.positions = pos[: cap.ids.shape[0]] if pos is not None else torch.ones_like(cap.ids)  # no start
            out = super()._model_forward(input_ids, positions, *args, **kwargs)
            if st is not None:
                st.count_applied()  # device ops queued after the forward: where the edits acted
            return out
        finally:
            if cap is not None:
                cap.ids = cap.positions = None
            if ro is not None:
                ro.end_step()


class SteeringWorkerExtension:
    """vLLM `worker_extension_cls`: steering for every request that carries `extra_args["steering"]`."""

    @property
    def model_runner(self):
        try:
            return self.__dict__["_functok_runner"]
        except KeyError:
            raise AttributeError("model_runner") from None

    @model_runner.setter
    def model_runner(self, runner) -> None:
        if runner is not None:  # WorkerBase assigns None first
            compat.check_runner(runner)
            runner = compat.mix_in(runner, SteeringRunnerMixin, "Steering")
        self.__dict__["_functok_runner"] = runner

    def functok_capture_begin(
        self, layers: list[int], skip_id: int = -1, bos_id: int = -1, fn_ids=(), exclude_sinks: bool = True
    ) -> None:
        """Start capture mode: every forward from now on adds its token-feature edges at `layers` (positions holding
        `skip_id` add none, nor attention sinks with `exclude_sinks`; `fn_ids`: the function tokens, for the
        per-window records) until `functok_capture_save`. Needs an eager engine; one session at a time."""
        runner = self.model_runner
        if runner.functok_capture is not None:
            raise RuntimeError("a functok capture is already running on this worker")
        runner.functok_capture = RunnerCapture(runner, list(layers), skip_id, bos_id, fn_ids, exclude_sinks)

    def functok_capture_save(self, out_dir: str) -> list[str]:
        """End capture mode; write out_dir/layer_{L}.safetensors (`EdgeBits.state()`) and return the paths."""
        runner = self.model_runner
        cap, runner.functok_capture = runner.functok_capture, None
        if cap is None:
            raise RuntimeError("no functok capture is running on this worker")
        return cap.save(out_dir, write=compat.tp_rank() == 0)

    def functok_applied(self, tag: str) -> int | None:
        """Positions where this worker steered the request named `tag` (its `extra_args["functok_id"]`, else its
        vLLM request id), each counted once; None if it knows no such steered request. For
        `collective_rpc("functok_applied", args=(tag,))` when the request has ended; a finished one is read once."""
        st = self.model_runner.functok
        return st.applied(tag) if st is not None else None

    def functok_features(self, asks: dict) -> dict:
        """Feature entries of requests named by tag: {tag: [generated tokens wanted, with the prompt's]} -> {tag:
        {"prompt": [...], "generated": [...]}} (`readout.FeatureReadout.take`). For `collective_rpc`."""
        ro = self.model_runner.functok_readout
        return ro.take(asks) if ro is not None else {}

    def functok_features_drop(self, tag: str) -> None:
        """Forget the unread features of a request that ended without reading them (aborted)."""
        ro = self.model_runner.functok_readout
        if ro is not None:
            ro.drop(tag)

    def functok_readout(self, tag: str) -> dict | None:
        """The values of the finished request named `tag` that asked for a `readout` (`series_op.SeriesReadout.take`:
        {"positions", "values", "columns"}), once; None if this worker knows no such request. For `collective_rpc`."""
        ro = self.model_runner.functok_readout
        return ro.series.take(tag) if ro is not None else None

    def functok_monitor(self, asks: dict) -> dict:
        """One readout series of running requests, kept for `functok_readout` (`series_op.SeriesReadout.peek`): {tag:
        [column, since]} -> {tag: {"positions", "values"}}. For `collective_rpc`, per delta of a `stop_when` request."""
        ro = self.model_runner.functok_readout
        return ro.series.peek(asks) if ro is not None else {}

    def functok_readout_drop(self, tag: str) -> None:
        """Forget the values of a request that ended without reading them (aborted)."""
        ro = self.model_runner.functok_readout
        if ro is not None:
            ro.series.drop(tag)

    def functok_request_capture(self, tag: str) -> dict | None:
        """The rows a finished request named `tag` captured (`series_op.CaptureCopy.take`: {"positions", "rows"}),
        once; None if this worker knows no such request. For `collective_rpc`."""
        ro = self.model_runner.functok_readout
        return ro.capture.take(tag) if ro is not None else None

    def functok_request_capture_drop(self, tag: str) -> None:
        """Forget the rows of a request that ended without reading them (aborted)."""
        ro = self.model_runner.functok_readout
        if ro is not None:
            ro.capture.drop(tag)

    def functok_sae_bytes(self) -> dict[int, int]:
        """{layer: bytes} of the SAE tensors this worker holds (each storage once), for `collective_rpc`: what a
        capture-only engine saves is measured here, not assumed."""
        runner = self.model_runner
        saes = runner.functok_capture_saes
        if saes is None:
            st = runner.functok
            saes = {k: op.sae for k, op in st.table.layers.items() if op.sae is not None} if st is not None else {}
        return {layer: sae_bytes(sae) for layer, sae in saes.items()}

    def functok_stats(self) -> dict[str, int]:
        """Counters of this worker's steering (for `collective_rpc("functok_stats")`)."""
        st = self.model_runner.functok
        return st.stats() if st is not None else {}


def sae_bytes(sae: SAE) -> int:
    """Bytes of the tensors one SAE object holds (its stored tensors and what its architecture derived), each
    storage counted once."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in vars(sae).values()
        if isinstance(t, torch.Tensor)
    }
    storages |= {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in sae.tensors.values()}
    return sum(storages.values())


def capture_saes(runner, cfg: FunctokConfig) -> dict[int, SAE]:
    """A capture-only engine's SAEs: {layer: SAE} with encoders only (`SAE.load(decoder=False)`), in `cfg.sae_dtype`
    (default the model's), on this worker's device; only those at layers this rank holds (pipeline parallel)."""
    mc = runner.model_config
    layers = placement.decoder_layers(runner.get_model())
    configs = load_saes(list(cfg.saes), mc.get_hidden_size(), len(layers), weights=False)
    mine = [c.path for c in configs.values() if compat.held(layers[placement.layer_of(c.hook)])]
    dtype = getattr(torch, cfg.sae_dtype) if cfg.sae_dtype else mc.dtype
    saes = load_saes(mine, mc.get_hidden_size(), len(layers), runner.device, dtype, decoder=False)
    log.info("functok capture-only: encoder-only SAEs at layers %s in %s, no steering", sorted(saes), dtype)
    return saes


def install_steering(runner, cfg: FunctokConfig) -> BatchSteering | None:
    """Attach the steering layers to the loaded model (before warm-up/compile) and return the per-step state (None
    without SAEs or steering layers: nothing to steer)."""
    if not (cfg.saes or cfg.steer_layers):
        log.warning("functok: no SAEs or steer_layers for %s; requests run unsteered", runner.model_config.model)
        return None
    mc = runner.model_config
    layers = placement.decoder_layers(runner.get_model())
    dtype, device = mc.dtype, runner.device
    saes = load_saes(list(cfg.saes), mc.get_hidden_size(), len(layers), device, dtype)
    try:  # add-only layers: vectors without an SAE, at the layer's output
        add_layers = add_only_points(cfg.steer_layers, {k: sae.cfg for k, sae in saes.items()}, len(layers))
    except ValueError as e:
        raise ValueError(f"steer_layers: {e}") from None
    points = {k: sae.cfg.hook for k, sae in saes.items()} | add_layers
    mine = {k for k, p in points.items() if compat.held(layers[placement.layer_of(p)])}  # pipeline parallel
    saes = {k: sae for k, sae in saes.items() if k in mine}
    add_layers = {k: p for k, p in add_layers.items() if k in mine}
    targets = {}
    for layer in sorted(mine):
        try:
            targets[layer] = placement.target(layers, points[layer], pairs=True)
        except ValueError as e:
            what = (
                f"{saes[layer].cfg.path}: cannot apply an SAE at {saes[layer].cfg.hook_name}"
                if layer in saes
                else (f"steer_layers: cannot add at layer {layer}")
            )
            raise ValueError(f"{what} on vLLM: {e}") from None
    max_slots = compat.max_rows(runner) + 1  # a slot per batch row, plus the zero row
    table = SteeringTable(
        saes,
        max_slots,
        cfg.limits.max_clamps,
        compat.max_step_tokens(runner),
        dtype,
        device,
        add_layers=add_layers,
        d_model=mc.get_hidden_size(),
        max_projections=cfg.limits.max_projections,
        max_conditions=cfg.limits.max_condition_columns,
    )
    for layer, op in table.layers.items():
        mod = targets[layer]
        mod.functok_steer = op
        mod.functok_layer = layer  # the SAE's layer, for the readout op
        mod.register_buffer("functok_marker", torch.zeros(1, device=device), persistent=False)
        placement.attach(layers, op.hook, steer_and_read, pairs=True)  # for the engine's life, before compile
    fn_mask = FunctionTokens.load(cfg.function_tokens).mask(mc.get_vocab_size(), device=device)
    _fingerprint(runner.vllm_config, table, cfg)
    log.info(
        "functok steering at %s (%d slots, %d clamp, %d projection and %d condition columns a layer, %d tokens a step)",
        ", ".join(op.hook.name for op in table.layers.values()),
        max_slots,
        table.max_clamps,
        table.max_projections,
        table.max_conditions,
        table.slot_index.shape[0],
    )
    return BatchSteering(table, fn_mask, lambda value, extra=None: _local_spec(value, cfg, table, extra))


def _local_spec(value, cfg: FunctokConfig, table: SteeringTable, extra: dict | None = None) -> SteeringSpec | None:
    """The admission hook's canonical key, parsed and checked once in this process by the one parser (a spec that
    reached the worker another way must not crash it: BatchSteering runs it unsteered, logged), its vectors'
    directions read from the request (`extra[VECTORS]`, each checked against its id); the edits at layers this rank
    holds (all of them without pipeline parallel)."""
    payload = (extra or {}).get(VECTORS)
    carried = decode_payloads(payload) if payload is not None else {}

    def from_request(name: str, version: str | None):
        if version not in carried:
            raise LookupError(f"vector {name!r}: the request carries no content for version {version!r}")
        return carried[version]

    spec = parse_steering(value, XARG, SteeringContext(cfg.info, cfg.limits, from_request))
    return spec.local(table.layers) if spec is not None else None


def _fingerprint(vllm_config, table: SteeringTable, cfg: FunctokConfig) -> None:
    """Make vLLM's compile-cache keys (which hash additional_config) depend on the steering in the graph."""
    mods = (core_steer, core_condition, compat, feature_readout)
    src = b"".join(Path(m.__file__).read_bytes() for m in mods) + Path(__file__).read_bytes()
    what = {
        "hooks": [op.hook.name for op in table.layers.values()],
        "shapes": [
            table.max_slots,
            table.max_clamps,
            table.max_projections,
            table.max_conditions,
            int(table.slot_index.shape[0]),
        ],
        "dtype": str(table.dtype),
        "saes": [str(p) for p in cfg.saes],
        "steer_layers": list(cfg.steer_layers),
        "norms": [op.norm for op in table.layers.values()],
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode() + src).hexdigest()[:16]
    if isinstance(vllm_config.additional_config, dict):
        vllm_config.additional_config[GRAPH_KEY] = digest
    else:
        log.warning("additional_config is not a dict: vLLM's compile cache cannot tell steered graphs apart")
