"""The one check of whether vLLM can run here: it asks vLLM's own platform loader in a child process, reports the
kernel library that loader chose for this CPU, and turns a child killed by an illegal instruction into a reason. The
AVX2 library is loaded and run on whatever CPU runs the tests, so a machine with AVX-512 also checks what a machine
without it would load."""

import subprocess
import sys

import pytest
import torch

from functok_vllm.engines.vllm.available import _probe, cpu_isa, vllm_status

STATUS = vllm_status()
needs_vllm = pytest.mark.skipif(not STATUS.ok, reason=STATUS.line())


@needs_vllm
def test_the_status_names_the_kernel_library_vllm_chose_for_this_cpu():
    flags = cpu_isa().split()
    if torch.cuda.is_available():
        want = "_C"
    elif "avx512_bf16" in flags:
        want = "_C"
    elif "avx512f" in flags:
        want = "_C_AVX512"
    else:
        want = "_C_AVX2"
    assert STATUS.variant == want, STATUS
    assert STATUS.version == "0.32.0" and STATUS.reason is None
    assert f"kernels {want}" in STATUS.line()


AVX2_RUN = r"""
import os, re
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
import torch
torch.cpu._is_avx512_supported = lambda: False  # what vLLM's loader sees on a CPU without AVX-512
from vllm.platforms import current_platform
current_platform.import_kernels()
libs = sorted(set(re.findall(r"/vllm/(_C(?:_[A-Z0-9]+)?)\.[^/\s]*so", open("/proc/self/maps").read())))
torch.manual_seed(0)
x, w = torch.randn(7, 576), torch.rand(576) + 0.5
out = torch.empty_like(x)
torch.ops._C.rms_norm(out, x, w, 1e-5)
ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
print("LIBS", ",".join(libs), "ERR", float((out - ref).abs().max()))
"""


@needs_vllm
def test_the_avx2_kernels_load_and_compute_rms_norm_on_this_cpu():
    r = subprocess.run([sys.executable, "-c", AVX2_RUN], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("LIBS"))
    _, libs, _, err = line.split()
    assert libs == "_C_AVX2", line
    assert float(err) < 1e-5, line


def test_a_probe_killed_by_an_illegal_instruction_is_a_reason_not_a_crash():
    s = _probe("import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    assert not s.ok and "SIGILL" in s.reason and "illegal instruction" in s.reason
    assert s.line().startswith("vLLM not usable here")


def test_a_probe_that_prints_nothing_is_a_reason_not_a_crash():
    s = _probe("raise SystemExit(3)")
    assert not s.ok and "exited 3" in s.reason
