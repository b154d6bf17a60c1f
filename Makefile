# `make serve` and `make test` are all a newcomer needs; both set up .venv first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# A machine with an NVIDIA driver gets CUDA torch and onnxruntime-gpu; others the CPU build of
# torch 2.13.0 and plain onnxruntime. Override either: `make install TORCH='torch==2.13.0' ORT=cpu`.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ORT ?= $(if $(HAS_GPU),gpu,cpu)
TORCH ?= $(if $(HAS_GPU),torch,torch==2.13.0)

comma := ,

.PHONY: install lint test serve bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	@# the two onnxruntime packages overwrite each other's files: keep only the one asked for
	$(BIN)/pip uninstall -q -y $(if $(filter gpu,$(ORT)),onnxruntime,onnxruntime-gpu) 2>/dev/null || true
	@# Pipecat (its integration's test) needs the CPU onnxruntime: only where that is the one installed
	$(BIN)/pip install -q -e ".[$(ORT),musetalk,test$(if $(filter cpu,$(ORT)),$(comma)pipecat)]"
	@touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check streamer tests scripts

test: lint
	@scripts/system-packages
	$(BIN)/python -m pytest -q

serve: install
	$(BIN)/streamer serve

bench: install
	for what in engine audio avatar live; do $(BIN)/streamer bench $$what --record BENCHMARKS.md || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
