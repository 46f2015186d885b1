# Two commands for a newcomer (see README.md):
#   make train   set up .venv on first use, then train configs/tiny.yaml on the built-in corpus
#   make test    set up .venv on first use, then run the whole test suite
# Torch: when the venv has no torch yet, TORCH_SPEC is installed first (the CPU wheel here).
# The mpi extra (mpich's wheel brings mpirun/mpiexec into the venv, and mpi4py) comes second,
# so that a platform without an mpich wheel still gets a working setup, minus the mpirun test.
# To reuse an existing CUDA torch: make VENV_FLAGS=--system-site-packages train
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
PYTEST_ARGS ?=
export DS_BUILD_OPS ?= 0
# DeepSpeed JIT-builds a small comm op on first start; one cache per venv, so two checkouts
# with different venvs do not keep rebuilding (and locking) each other's copy.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export OMP_NUM_THREADS ?= 2

.PHONY: setup train test test-fast bench lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	$(PIP) install -e ".[dev,mpi]" || echo "warning: the mpi extra (mpich, mpi4py) did not install; the mpirun test will be skipped" >&2
	touch $@

train: setup
	$(VENV)/bin/moeforge train $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/moeforge bench moe

lint: setup
	$(VENV)/bin/ruff check moe parallel attention launch tests

# The prepared device check on one CUDA GPU (docs/gpu.md): its own venv (.venv-gpu, a CUDA
# torch from PyPI on first use), the gpu tests, both benches on CUDA and a short training run
# with MFU; writes gpu-check/summary.md. ARGS=--dry-run prints the plan.
.PHONY: gpu-check
gpu-check:
	VENV=.venv-gpu TORCH_EXTENSIONS_DIR=$(abspath .venv-gpu)/torch_extensions tools/gpu_check.sh $(ARGS)
