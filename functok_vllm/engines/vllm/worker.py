"""The vLLM worker extension: puts the steering core into the model before it is compiled, and fills it every step.

Use: `LLM(..., worker_extension_cls=EXTENSION)` or `vllm serve ... --worker-extension-cls EXTENSION`, where
EXTENSION = "functok_vllm.engines.vllm.worker.SteeringWorkerExtension"; settings come from
`additional_config["functok"]` (see `config.py`).

How it gets in. vLLM appends the extension class to the worker's bases and refuses extensions that redefine a worker
attribute, so the extension defines none: it only intercepts the worker's `self.model_runner = ...` assignment with
a property, and swaps the new runner's class for a subclass that mixes in `SteeringRunnerMixin` (V1 model runner,
which vLLM 0.32 uses on CPU: there is no Triton). The mixin overrides three runner methods:

- `load_model`: after the weights are loaded, and before vLLM warms up or compiles anything, every decoder layer
  with an SAE gets the core's `SteeringLayer` as a submodule and a class that adds the steering update to its output
  (`SteeredLayerMixin`). Because that is in the module tree when Dynamo traces the model, the compiled graph contains
  the gather-add and clamp matmuls reading the table's buffers, which are graph inputs updated in place.
- `execute_model`: new requests' metadata is cached (`BatchSteering.add_request`), finished ones are released.
- `_model_forward` (vLLM's documented override point): `BatchSteering.prepare` writes the per-token slot index,
  and in capture mode (`functok_capture_begin` / `functok_capture_save`, offline analysis, see `capture.py`) the
  step's token ids are handed to the capture hooks.

Layer outputs. A vLLM decoder layer returns `(hidden_states, residual)`; the residual stream after the layer is their
sum, which the next layer's fused add+norm (or the final norm) forms. A steered layer returns
`(hidden_states + delta(h), residual)` (`SteeredLayerMixin`): the next add gives h + delta, the transformers engine's
hooked output.

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

from functok_vllm.core import SAE, FunctionTokens, SAELoadError, SteeringSpec, SteeringTable
from functok_vllm.core import steer as core_steer
from functok_vllm.engines.vllm.batch_state import BatchSteering
from functok_vllm.engines.vllm.capture import RunnerCapture, tp_rank
from functok_vllm.engines.vllm.config import FunctokConfig, from_additional_config, spec_from_xarg

log = logging.getLogger("functok.vllm")
GRAPH_KEY = "functok_graph"  # additional_config key holding the steering fingerprint (worker process only)


class SteeredLayerMixin:
    """Mixed into a decoder layer's class (`Steered<Layer>`): THE ADD of the vLLM path happens here.

    A vLLM decoder layer returns `(hidden, residual)` whose sum is the residual stream h leaving it. The steered layer
    returns `(hidden + delta(h), residual)`, with the add (and the clamp encode of h) inside the one opaque custom op
    `functok::steered_hidden` (`core/steer.py` says why it must be opaque to Inductor); the next layer's fused
    add+norm, or the final norm, then forms h + delta, what the transformers engine's hook produces.
    """

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if isinstance(out, tuple) and len(out) == 2 and out[1] is not None:
            hidden, residual = out
            return self.functok_steer.steered_hidden(hidden, residual), residual
        return self.functok_steer.steered_hidden(out, None)  # one tensor is the whole residual stream


class SteeringRunnerMixin:
    """Mixed into the V1 model runner's class (see the module docstring)."""

    functok: BatchSteering | None = None
    functok_capture: RunnerCapture | None = None  # a capture session (offline analysis), see capture.py
    functok_step_tokens = 0

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        self.functok = install_steering(self)

    def execute_model(self, scheduler_output, *args, **kwargs):
        st = self.functok
        self.functok_step_tokens = scheduler_output.total_num_scheduled_tokens  # the unpadded rows of this forward
        if st is not None:
            st.finish(scheduler_output.finished_req_ids)
            st.resumed += len(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
            for r in scheduler_output.scheduled_new_reqs:
                extra = r.sampling_params.extra_args if r.sampling_params is not None else None
                st.add_request(r.req_id, r.prompt_token_ids, extra, r.num_computed_tokens)
        return super().execute_model(scheduler_output, *args, **kwargs)

    def _model_forward(self, input_ids=None, positions=None, *args, **kwargs):
        st = self.functok
        ids = input_ids if input_ids is not None else self.input_ids.gpu
        if st is not None:
            if positions is None:  # no positions to select by: this forward runs unsteered
                st.clear()
            else:
                pos = positions if positions.dim() == 1 else positions[0]  # M-RoPE (3, tokens): row 0 is the text
                rows = self.input_batch.req_ids[: self.input_batch.num_reqs]
                st.prepare(rows, ids[: pos.shape[0]], pos, self.query_start_loc.gpu)
        cap = self.functok_capture
        if cap is None:
            return super()._model_forward(input_ids, positions, *args, **kwargs)
        cap.ids = ids[: self.functok_step_tokens]  # (tokens,) the rows the capture hooks read
        try:
            return super()._model_forward(input_ids, positions, *args, **kwargs)
        finally:
            cap.ids = None


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
        self.__dict__["_functok_runner"] = steered_runner(runner)

    def functok_capture_begin(self, layers: list[int], skip_id: int = -1) -> None:
        """Start capture mode: every forward from now on adds its token-feature edges at `layers` (positions holding
        `skip_id` add none) until `functok_capture_save`. Needs an eager engine; one session at a time."""
        runner = self.model_runner
        if runner.functok_capture is not None:
            raise RuntimeError("a functok capture is already running on this worker")
        runner.functok_capture = RunnerCapture(runner, list(layers), skip_id, decoder_layers)

    def functok_capture_save(self, out_dir: str) -> list[str]:
        """End capture mode; write out_dir/layer_{L}.safetensors (`EdgeBits.state()`) and return the paths."""
        runner = self.model_runner
        cap, runner.functok_capture = runner.functok_capture, None
        if cap is None:
            raise RuntimeError("no functok capture is running on this worker")
        return cap.save(out_dir, write=tp_rank() == 0)

    def functok_applied(self, tag: str) -> int | None:
        """Positions where this worker steered the request named `tag` (its `extra_args["functok_id"]`, else its
        vLLM request id), each counted once; None if it knows no such steered request. For
        `collective_rpc("functok_applied", args=(tag,))` when the request has ended; a finished one is read once."""
        st = self.model_runner.functok
        return st.applied(tag) if st is not None else None

    def functok_stats(self) -> dict[str, int]:
        """Counters of this worker's steering (for `collective_rpc("functok_stats")`)."""
        st = self.model_runner.functok
        return st.stats() if st is not None else {}


_RUNNER_CLASSES: dict[type, type] = {}
_LAYER_CLASSES: dict[type, type] = {}


def steered_runner(runner):
    """The runner with `SteeringRunnerMixin` mixed into its class (None, which WorkerBase assigns first, stays)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if runner is None:
        return None
    if not isinstance(runner, GPUModelRunner):
        raise RuntimeError(
            f"functok steering supports vLLM's V1 model runner, not {type(runner).__name__}; "
            "start vLLM with VLLM_USE_V2_MODEL_RUNNER=0"
        )
    cls = type(runner)
    if cls not in _RUNNER_CLASSES and not issubclass(cls, SteeringRunnerMixin):
        _RUNNER_CLASSES[cls] = type(f"Steering{cls.__name__}", (SteeringRunnerMixin, cls), {})
    runner.__class__ = _RUNNER_CLASSES.get(cls, cls)
    return runner


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a vLLM model: `model.layers` (Llama-style models, and the Hugging Face model inside
    vLLM's Transformers backend, e.g. GPT-NeoX) or `transformer.h` (GPT-2), also inside a multimodal wrapper's
    `language_model`."""
    for owner in (model, getattr(model, "language_model", None)):
        for base, attr in (("model", "layers"), ("transformer", "h")):
            layers = getattr(getattr(owner, base, None), attr, None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers):
                return layers
    raise SAELoadError(
        f"cannot find the decoder layers of {type(model).__name__} (looked for model.layers and transformer.h)"
    )


def install_steering(runner) -> BatchSteering:
    """Attach the steering layers to the loaded model (before warm-up/compile) and return the per-step state."""
    from vllm.model_executor.models.utils import PPMissingLayer

    cfg = from_additional_config(runner.vllm_config.additional_config, runner.model_config.model)
    mc = runner.model_config
    layers = decoder_layers(runner.get_model())
    hidden, dtype, device = mc.get_hidden_size(), mc.dtype, runner.device
    saes = {}
    for layer, meta in cfg.sae_meta.items():
        if not 0 <= layer < len(layers):
            raise SAELoadError(f"{meta.path}: layer {layer} is outside the model's {len(layers)} decoder layers")
        if meta.d_in != hidden:
            raise SAELoadError(f"{meta.path}: d_in {meta.d_in} does not match the model's hidden size {hidden}")
        if not isinstance(layers[layer], PPMissingLayer):
            saes[layer] = SAE.load(meta.path, device=device, dtype=dtype)
    max_tokens = runner.input_ids.gpu.shape[0]  # the runner's padded token buffer bounds every forward
    max_slots = runner.scheduler_config.max_num_seqs + 1  # a slot per batch row, plus the zero row
    table = SteeringTable(saes, max_slots, max(cfg.max_clamps, cfg.max_edits), max_tokens, dtype, device)
    for layer, op in table.layers.items():
        mod = layers[layer]
        cls = type(mod)
        if cls not in _LAYER_CLASSES:
            _LAYER_CLASSES[cls] = type(f"Steered{cls.__name__}", (SteeredLayerMixin, cls), {})
        mod.functok_steer = op
        mod.__class__ = _LAYER_CLASSES[cls]
    fn_mask = FunctionTokens.load(cfg.function_tokens).mask(mc.get_vocab_size(), device=device)
    _fingerprint(runner.vllm_config, table, cfg)
    log.info(
        "functok steering at layers %s (%d slots, %d clamp columns a layer, %d tokens a step)",
        sorted(table.layers),
        max_slots,
        table.max_clamps,
        max_tokens,
    )
    return BatchSteering(table, fn_mask, lambda value: _local_spec(value, cfg, table))


def _local_spec(value, cfg: FunctokConfig, table: SteeringTable) -> SteeringSpec | None:
    """Parse and check a spec; keep the edits at layers this rank holds (all of them without pipeline parallel)."""
    spec = spec_from_xarg(value)
    if spec is None:
        return None
    cfg.check(spec)
    edits = tuple(e for e in spec.edits if e.layer in table.layers)
    return SteeringSpec(edits, spec.positions) if edits else None


def _fingerprint(vllm_config, table: SteeringTable, cfg: FunctokConfig) -> None:
    """Make vLLM's compile-cache keys (which hash additional_config) depend on the steering in the graph."""
    src = Path(core_steer.__file__).read_bytes() + Path(__file__).read_bytes()
    what = {
        "layers": sorted(table.layers),
        "shapes": [table.max_slots, table.max_clamps, int(table.slot_index.shape[0])],
        "dtype": str(table.dtype),
        "saes": [str(m.path) for m in cfg.sae_meta.values()],
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode() + src).hexdigest()[:16]
    if isinstance(vllm_config.additional_config, dict):
        vllm_config.additional_config[GRAPH_KEY] = digest
    else:
        log.warning("additional_config is not a dict: vLLM's compile cache cannot tell steered graphs apart")
