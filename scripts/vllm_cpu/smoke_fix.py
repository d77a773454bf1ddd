"""Runtime fix for vLLM 0.32.0's no-Triton CPU fallback of the slot-mapping
kernel, used only by scripts/vllm_cpu/smoke.py.

The bug
-------
``CpuPlatform.register_triton_kernel_overrides()`` (vllm/platforms/cpu.py)
replaces the Triton kernel
``vllm.v1.worker.block_table.ComputeSlotMappingKernel.kernel`` with
``vllm.utils.cpu_triton_utils._compute_slot_mapping_kernel_impl`` through
``vllm.triton_utils.dispatcher.KernelOverride``.  The launcher calls the
kernel as ``kernel[grid](**kwargs)`` with the *Triton kernel's* argument
names::

    (num_tokens, max_num_tokens, query_start_loc_ptr, positions_ptr,
     block_table_ptr, block_table_stride, slot_mapping_ptr,
     KV_CACHE_BLOCK_SIZE, TOTAL_CP_WORLD_SIZE, TOTAL_CP_RANK,
     CP_KV_CACHE_INTERLEAVE_SIZE, PAD_ID, BLOCK_SIZE)

``KernelOverride`` forwards by keyword only when the implementation's
parameter names equal those names; otherwise it forwards the values
*positionally* in that order.  The 0.32.0 implementation has different
names and an extra ``block_size`` parameter before ``slot_mapping`` (and
``BLOCKS_PER_KV_BLOCK`` after ``KV_CACHE_BLOCK_SIZE``), so the slot-mapping
tensor lands in ``block_size``, the block size lands in ``slot_mapping`` and
so on: the first forward pass fails.

The fix
-------
Replace the module attribute
``vllm.utils.cpu_triton_utils._compute_slot_mapping_kernel_impl`` (it is
read when ``register_triton_kernel_overrides`` runs during model-runner
init, in the engine-core process) by a function whose parameter names are
exactly the Triton kernel's, so it is called by keyword, and which calls
``torch.ops._C.compute_slot_mapping_kernel_impl(query_start_loc, positions,
block_table, slot_mapping, block_size)`` with the kernel's
``KV_CACHE_BLOCK_SIZE`` as ``block_size``.  It also writes PAD_ID into the
padding tail ``slot_mapping[num_tokens:max_num_tokens]`` like the Triton
kernel's last program does.

``apply()`` must run in every process that builds a model runner; calling it
at import time of the main script covers both fork and spawn workers (the
spawned child re-imports the main module).
"""

from __future__ import annotations

import torch


def compute_slot_mapping_kernel_impl(
    num_tokens: int,
    max_num_tokens: int,
    query_start_loc_ptr: torch.Tensor,  # [num_reqs + 1] int32
    positions_ptr: torch.Tensor,  # [num_tokens] int64
    block_table_ptr: torch.Tensor,  # [max_num_reqs, max_blocks_per_req] int32
    block_table_stride: int,
    slot_mapping_ptr: torch.Tensor,  # [max_num_tokens] int64
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
        query_start_loc_ptr,
        positions_ptr,
        block_table,
        slot_mapping_ptr,
        int(KV_CACHE_BLOCK_SIZE),
    )
    if max_num_tokens > num_tokens:
        slot_mapping_ptr[num_tokens:max_num_tokens].fill_(PAD_ID)


def apply() -> None:
    """Install the fix (idempotent)."""
    from vllm.utils import cpu_triton_utils

    cpu_triton_utils._compute_slot_mapping_kernel_impl = compute_slot_mapping_kernel_impl
