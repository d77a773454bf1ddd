"""Runtime fix for vLLM 0.32.0's no-Triton CPU fallback of the slot-mapping kernel (applied by the plugin on CPU).

`CpuPlatform.register_triton_kernel_overrides()` replaces the Triton kernel
`vllm.v1.worker.block_table.ComputeSlotMappingKernel.kernel` by
`vllm.utils.cpu_triton_utils._compute_slot_mapping_kernel_impl`. The launcher calls the kernel with the Triton
kernel's argument names, and the dispatcher forwards by keyword only when the replacement's parameter names are
exactly those; otherwise it forwards the values positionally. The 0.32.0 replacement has an extra `block_size`
parameter before `slot_mapping` (and `BLOCKS_PER_KV_BLOCK` after `KV_CACHE_BLOCK_SIZE`), so the slot-mapping tensor
lands in `block_size` and the first forward fails.

`apply()` swaps in a function with the Triton kernel's exact parameter names that calls the same C++ op with the
kernel's `KV_CACHE_BLOCK_SIZE` as block size, and writes PAD_ID into the padding tail like the Triton kernel's last
program does. It must run in every worker process before the model runner initializes: vLLM's `init_worker` loads
the general plugins (our `register()`) just before it registers the overrides.
"""

from __future__ import annotations

import torch


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


def needed() -> bool:
    """True while vLLM's CPU fallback still takes the extra `block_size` parameter (0.32.0)."""
    import inspect

    from vllm.utils import cpu_triton_utils

    impl = cpu_triton_utils._compute_slot_mapping_kernel_impl
    return impl is not compute_slot_mapping_kernel_impl and "block_size" in inspect.signature(impl).parameters


def apply() -> None:
    """Install the fix (idempotent; a no-op once vLLM's own fallback has the kernel's signature)."""
    from vllm.utils import cpu_triton_utils

    if needed():
        cpu_triton_utils._compute_slot_mapping_kernel_impl = compute_slot_mapping_kernel_impl
