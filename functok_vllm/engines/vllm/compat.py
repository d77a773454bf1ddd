"""Every place functok touches vLLM's private internals, in one module, checked against the installed version.

functok steers inside stock vLLM through its documented extension points (a general plugin, a worker extension, the
runner's `_model_forward`) and, where vLLM has none, through the internals below, read from vLLM 0.32.0's source:

- API process: `InputProcessor.process_inputs` (wrapped by the admission hook, `admission.py`, which keeps its
  state on the processor: `processor_state`);
- workers: the model runner's class (a mixin swapped in: the one class swap left, since vLLM offers no hook around
  a step), `input_batch.req_ids`/`num_reqs`, `query_start_loc`, `input_ids`, `scheduler_config.max_num_seqs`, the
  scheduler output's `scheduled_new_reqs`, `scheduled_cached_reqs.resumed_req_ids`, `finished_req_ids`,
  `total_num_scheduled_tokens`; the compilation config and the forward context (`register_forward_state`);
- model modules: `PPMissingLayer` (the steering itself is placed by `engines/placement.py` with ordinary module
  hooks, no class or name of the model changed);
- CPU: vLLM 0.32.0's no-Triton fallback of the slot-mapping kernel, whose parameter names are wrong (`cpu_fix`).

`check_version()` runs in `register()`: another vLLM release is refused with one line saying which are supported.
"""

from __future__ import annotations

import inspect
from functools import wraps

import torch

SUPPORTED = ("0.32.",)  # vLLM releases whose internals this module was written against


def check_version() -> None:
    import vllm

    if not str(vllm.__version__).startswith(SUPPORTED):
        raise RuntimeError(
            f"functok-vllm supports vLLM {', '.join(v + 'x' for v in SUPPORTED)} (it uses internals that change "
            f"between releases); the installed vLLM is {vllm.__version__}"
        )


# ---- API process ----------------------------------------------------------------------------------------------------


def wrap_process_inputs(wrapper) -> None:
    """Wrap `InputProcessor.process_inputs` once (idempotent): `wrapper(original, self, request_id, prompt, params,
    *args, **kwargs)` runs instead, for every request of `LLM`, `AsyncLLM` and `vllm serve`."""
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor.process_inputs, "_functok", False):
        return
    original = InputProcessor.process_inputs

    @wraps(original)
    def process_inputs(self, *args, **kwargs):
        return wrapper(original, self, *args, **kwargs)

    process_inputs._functok = True
    InputProcessor.process_inputs = process_inputs


def processor_state(processor, make):
    """The admission state of one `InputProcessor`: `make(processor.vllm_config)` on its first use, then kept on the
    processor itself (it lives and dies with it; no module cache, so two engines in one process never share it)."""
    state = processor.__dict__.get("_functok_admission")
    if state is None:
        state = processor.__dict__["_functok_admission"] = make(processor.vllm_config)
    return state


def resolve_qualname(qualname: str):
    """The object a `worker_extension_cls`-style qualified name names, resolved the way vLLM resolves it."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    return resolve_obj_by_qualname(qualname)


# ---- the model runner -----------------------------------------------------------------------------------------------

_MIXED: dict[tuple[type, type], type] = {}


def mix_in(obj, mixin: type, prefix: str):
    """Give `obj` (the model runner) the class `prefix + its class name` that puts `mixin` first (cached)."""
    cls = type(obj)
    if issubclass(cls, mixin):
        return obj
    key = (cls, mixin)
    if key not in _MIXED:
        _MIXED[key] = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    obj.__class__ = _MIXED[key]
    return obj


def check_runner(runner) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner):
        raise RuntimeError(
            f"functok steering supports vLLM's V1 model runner, not {type(runner).__name__}; "
            "start vLLM with VLLM_USE_V2_MODEL_RUNNER=0"
        )


def batch_rows(runner) -> list[str]:
    """Request ids of the persistent batch's rows, in row order."""
    return runner.input_batch.req_ids[: runner.input_batch.num_reqs]


def query_start_loc(runner) -> torch.Tensor:
    """(rows + 1,) row r owns the step's tokens [qsl[r], qsl[r + 1])."""
    return runner.query_start_loc.gpu


def row_starts_and_qsl(runner):
    """Host arrays of the step being run: each row's first position (its computed tokens before the step) and the
    query start locations (row r owns tokens [qsl[r], qsl[r + 1]))."""
    n = runner.input_batch.num_reqs
    return runner.input_batch.num_computed_tokens_cpu[:n], runner.query_start_loc.np[: n + 1]


def register_forward_state(vllm_config, key: str, obj) -> None:
    """Make `obj` reachable from every forward's context under `key` (`forward_state`): vLLM copies the compilation
    config's `static_forward_context` (where its attention layers register themselves for their ops) into each
    forward's context. How an opaque op inside the compiled graph finds its per-step state without a global."""
    vllm_config.compilation_config.static_forward_context[key] = obj


def forward_state(key: str):
    """What `register_forward_state` put under `key`, from the running forward's context (None outside one)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return get_forward_context().no_compile_layers.get(key) if is_forward_context_available() else None


def cuda_graphs(vllm_config) -> bool:
    """Does this engine replay captured CUDA graphs (where Python inside an op runs only at capture)?"""
    from vllm.config import CUDAGraphMode

    return vllm_config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE


def input_ids(runner) -> torch.Tensor:
    return runner.input_ids.gpu


def max_step_tokens(runner) -> int:
    """The runner's padded token buffer, which bounds every forward."""
    return runner.input_ids.gpu.shape[0]


def max_rows(runner) -> int:
    return runner.scheduler_config.max_num_seqs


def new_requests(scheduler_output):
    """(request id, prompt token ids, extra_args, prompt tokens found in the prefix cache) of newly scheduled ones."""
    for r in scheduler_output.scheduled_new_reqs:
        extra = r.sampling_params.extra_args if r.sampling_params is not None else None
        yield r.req_id, r.prompt_token_ids, extra, r.num_computed_tokens


def resumed_count(scheduler_output) -> int:
    return len(scheduler_output.scheduled_cached_reqs.resumed_req_ids)


def finished_ids(scheduler_output):
    return scheduler_output.finished_req_ids


def step_tokens(scheduler_output) -> int:
    """The unpadded rows of this step's forward."""
    return scheduler_output.total_num_scheduled_tokens


def is_eager(runner) -> bool:
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = runner.vllm_config.compilation_config
    return cc.mode == CompilationMode.NONE and cc.cudagraph_mode == CUDAGraphMode.NONE


def tp_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    try:
        return get_tensor_model_parallel_rank()
    except AssertionError:  # no tensor-parallel group (a single process): rank 0
        return 0


# ---- model modules ---------------------------------------------------------------------------------------------


def held(layer: torch.nn.Module) -> bool:
    """False for a layer another pipeline-parallel rank holds."""
    from vllm.model_executor.models.utils import PPMissingLayer

    return not isinstance(layer, PPMissingLayer)


# ---- CPU: vLLM 0.32.0's no-Triton fallback of the slot-mapping kernel ----------------------------------------------
# `CpuPlatform.register_triton_kernel_overrides()` replaces the Triton kernel `ComputeSlotMappingKernel.kernel` by
# `cpu_triton_utils._compute_slot_mapping_kernel_impl`. The launcher calls it with the Triton kernel's argument names,
# and the dispatcher forwards by keyword only when the replacement's names are exactly those; 0.32.0's has an extra
# `block_size` before `slot_mapping`, so the slot mapping lands in `block_size` and the first forward fails. The
# replacement below has the kernel's exact names, calls the same C++ op and writes PAD_ID into the padding tail like
# the Triton kernel's last program. It must be installed in every worker before the model runner initializes: vLLM's
# `init_worker` loads the general plugins (our `register()`) just before it registers the overrides.


def compute_slot_mapping_kernel_impl(
    num_tokens: int,
    max_num_tokens: int,
    query_start_loc_ptr: torch.Tensor,  # (num_reqs + 1,) int32
    positions_ptr: torch.Tensor,  # (num_tokens,) int64
    block_table_ptr: torch.Tensor,  # (max_num_reqs, max_blocks_per_req) int32
    block_table_stride: int,
    slot_mapping_ptr: torch.Tensor,  # (max_num_tokens,) int64
    KV_CACHE_BLOCK_SIZE: int,
    TOTAL_CP_WORLD_SIZE: int = 1,
    TOTAL_CP_RANK: int = 0,
    CP_KV_CACHE_INTERLEAVE_SIZE: int = 1,
    PAD_ID: int = -1,
    BLOCK_SIZE: int = 1024,
) -> None:
    assert TOTAL_CP_WORLD_SIZE == 1, "Context Parallelism is not supported on CPU."
    block_table = block_table_ptr
    if block_table.dim() != 2 or block_table.stride(0) != block_table_stride:
        block_table = block_table.reshape(-1).view(-1, block_table_stride)
    torch.ops._C.compute_slot_mapping_kernel_impl(
        query_start_loc_ptr, positions_ptr, block_table, slot_mapping_ptr, int(KV_CACHE_BLOCK_SIZE)
    )
    if max_num_tokens > num_tokens:
        slot_mapping_ptr[num_tokens:max_num_tokens].fill_(PAD_ID)


def cpu_fix_needed() -> bool:
    """True while vLLM's CPU fallback still takes the extra `block_size` parameter (0.32.0)."""
    from vllm.utils import cpu_triton_utils

    impl = cpu_triton_utils._compute_slot_mapping_kernel_impl
    return impl is not compute_slot_mapping_kernel_impl and "block_size" in inspect.signature(impl).parameters


def cpu_fix() -> None:
    """Install the fix on CPU (idempotent; a no-op once vLLM's own fallback has the kernel's signature)."""
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils

    if current_platform.is_cpu() and cpu_fix_needed():
        cpu_triton_utils._compute_slot_mapping_kernel_impl = compute_slot_mapping_kernel_impl
