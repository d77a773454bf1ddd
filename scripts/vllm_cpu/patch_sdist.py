#!/usr/bin/env python3
"""Patch an extracted vLLM 0.32.0 sdist so its CPU ``_C`` extension builds
offline with gcc 12.2 on x86-64 (used by scripts/build_vllm_cpu.sh).

Usage: patch_sdist.py SDIST_DIR

Every edit checks that its anchor text is present exactly as expected and
fails loudly otherwise.  The edits are idempotent: a marker file
``.functok_cpu_patched`` records that the tree has been patched.

Edits:
  1. cmake/cpu_extension.cmake: accept gcc >= 12.2 (upstream demands 12.3;
     12.2 builds fine).
  2. cmake/cpu_extension.cmake: skip oneDNN entirely (it is fetched from
     GitHub with FetchContent, unreachable here): the oneDNN block is turned
     off, dnnl_kernels.cpp is dropped from every source list and dnnl_ext is
     dropped from the link libraries.
     csrc/cpu/torch_bindings.cpp: the block registering the oneDNN ops
     (onednn_mm, create_onednn_mm_handler, onednn_scaled_mm, ...,
     static/dynamic_scaled_int8_quant, all implemented in dnnl_kernels.cpp)
     is compiled out.  vLLM's Python side checks
     ``hasattr(torch.ops._C, "create_onednn_mm_handler")`` and falls back to
     torch.nn.functional.linear for unquantized GEMMs.
  3. csrc/cpu/sgl-kernels/flash_mla.cpp (DeepSeek-V4 sparse MLA, gcc 12.2
     ICEs on it) is replaced with a stub whose op raises when called.
"""

from __future__ import annotations

import sys
from pathlib import Path

MARKER = ".functok_cpu_patched"

FLASH_MLA_STUB = """\
// functok: stub replacing vLLM's DeepSeek-V4 sparse-MLA CPU kernel
// (gcc 12.2 hits an internal compiler error on the original file).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

void flash_mla_with_kvcache_cpu(
    at::Tensor& out, at::Tensor& q, at::Tensor& window_cache_2d,
    at::Tensor& window_slots, int64_t window_block_size,
    at::Tensor& compressed_cache_2d, at::Tensor& compressed_slots,
    int64_t compressed_block_size, at::Tensor& attn_sink, double scale) {
  TORCH_CHECK(false,
              "flash_mla_with_kvcache_cpu is not available in this CPU build "
              "(stubbed out by functok scripts/vllm_cpu/patch_sdist.py)");
}
"""


def die(msg: str) -> None:
    print(f"patch_sdist.py: ERROR: {msg}", file=sys.stderr)
    sys.exit(1)


def replace(text: str, old: str, new: str, path: Path, count: int | None = 1) -> str:
    """Replace ``old`` by ``new``; ``count`` is the exact number of expected
    occurrences (None: at least one)."""
    n = text.count(old)
    if n == 0 or (count is not None and n != count):
        want = "at least 1" if count is None else str(count)
        die(f"{path}: expected {want} occurrence(s) of {old!r}, found {n}")
    return text.replace(old, new)


def patch_cmake(root: Path) -> None:
    path = root / "cmake" / "cpu_extension.cmake"
    text = path.read_text()

    # (1) gcc version gate.
    text = replace(
        text,
        "CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12.3))",
        "CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12.2))",
        path,
    )

    # (2) oneDNN: never enter the FetchContent block -> USE_ONEDNN OFF.
    onednn_if = (
        "if (ENABLE_X86_ISA OR (ASIMD_FOUND AND NOT APPLE_SILICON_FOUND) OR "
        "POWER9_FOUND OR POWER10_FOUND OR POWER11_FOUND OR RVV_FP16_FOUND OR "
        "RVV_BF16_FOUND OR S390_FOUND)"
    )
    text = replace(
        text,
        "# Build oneDNN for GEMM kernels\n" + onednn_if,
        "# Build oneDNN for GEMM kernels (disabled by functok: no GitHub access)\nif (FALSE)",
        path,
    )
    # dnnl_kernels.cpp in the generic, AVX512 and AVX2 source lists.
    lines = text.split("\n")
    kept = [ln for ln in lines if ln.strip() != '"csrc/cpu/dnnl_kernels.cpp"']
    if len(lines) - len(kept) != 3:
        die(f"{path}: expected 3 dnnl_kernels.cpp source lines, found {len(lines) - len(kept)}")
    text = "\n".join(kept)
    for var in ("_C_LIBS", "_C_AVX512_LIBS", "_C_AVX2_LIBS"):
        text = replace(text, f"set({var} numa dnnl_ext)", f"set({var} numa)", path)

    path.write_text(text)


def patch_bindings(root: Path) -> None:
    path = root / "csrc" / "cpu" / "torch_bindings.cpp"
    text = path.read_text()
    old = "  // Quantization\n#if defined(__AVX512F__) || defined(__AVX2__) ||"
    new = (
        "  // Quantization (oneDNN ops: disabled by functok, no dnnl_kernels.cpp)\n"
        "#if 0 && defined(__AVX512F__) || 0 && defined(__AVX2__) ||"
    )
    text = replace(text, old, new, path)
    # The rest of the guard ("(defined(__aarch64__) && ...) || defined(__powerpc64__)
    # || defined(__riscv_v) || defined(__s390x__)") is false on x86-64.
    if 'ops.def("release_dnnl_matmul_handler' not in text:
        die(f"{path}: oneDNN op registration not found where expected")
    path.write_text(text)


def patch_flash_mla(root: Path) -> None:
    path = root / "csrc" / "cpu" / "sgl-kernels" / "flash_mla.cpp"
    text = path.read_text()
    if "void flash_mla_with_kvcache_cpu(" not in text:
        die(f"{path}: flash_mla_with_kvcache_cpu definition not found")
    path.write_text(FLASH_MLA_STUB)


def main() -> None:
    if len(sys.argv) != 2:
        die("usage: patch_sdist.py SDIST_DIR")
    root = Path(sys.argv[1])
    if not (root / "cmake" / "cpu_extension.cmake").is_file():
        die(f"{root} does not look like a vLLM source tree")
    if (root / MARKER).exists():
        print(f"patch_sdist.py: {root} already patched")
        return
    patch_cmake(root)
    patch_bindings(root)
    patch_flash_mla(root)
    (root / MARKER).write_text("patched\n")
    print(f"patch_sdist.py: patched {root}")


if __name__ == "__main__":
    main()
