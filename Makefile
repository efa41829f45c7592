# wbscale: `make demo` trains the demo CRATE on CPU; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On a machine without an NVIDIA GPU take the CPU build of torch first: a bare `torch`
# requirement would pull a multi-GB CUDA build. PyTorch's own CPU wheel index is tried
# first (it has CPU wheels for every platform); where it cannot be reached, the plain pin.
HAS_NVIDIA_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU_PIN   ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS          ?= all,dev
PYTEST_ARGS    ?=

.PHONY: venv demo test test-fast lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
ifeq ($(HAS_NVIDIA_GPU),)
	$(BIN)/pip install --quiet --timeout 15 --retries 0 --index-url $(TORCH_CPU_INDEX) '$(TORCH_CPU_PIN)' 2>/dev/null \
		|| $(BIN)/pip install --quiet '$(TORCH_CPU_PIN)'
endif
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

demo: venv
	$(BIN)/wbscale fit demo
	$(BIN)/wbscale interpret collect --ckpt runs/demo --out runs/demo-interpret --tokens 16384
	$(BIN)/wbscale interpret report runs/demo-interpret

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check wbscale kernels tests

bench: venv
	$(BIN)/wbscale bench kernels

clean:
	rm -rf runs data/synthetic-stories .pytest_cache

# A real two-node SLURM cluster on this machine (root; Debian's slurm + munge packages),
# as the SLURM tests use it. `eval $$(slurm/local_cluster.sh env)` points sbatch at it.
.PHONY: slurm-up slurm-down
slurm-up:
	bash slurm/local_cluster.sh up

slurm-down:
	bash slurm/local_cluster.sh down

# `make gpu-check`: the whole GPU proof in one command (<= 8 min; results under bench/results/).
# On the GPU image there is no venv and no internet: wbscale is installed there, once, with
# `pip install --no-deps --no-build-isolation -e .` into the image's Python (which has torch,
# triton, lightning, transformers, tokenizers, safetensors); here the venv's is used.
GPU_CHECK_ARGS ?=
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
.PHONY: gpu-check
gpu-check:
	@$(GPU_PYTHON) -c "import wbscale.kernels, wbscale.bench.gpu" 2>/dev/null || \
		$(GPU_PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) -m wbscale.cli bench gpu $(GPU_CHECK_ARGS)
