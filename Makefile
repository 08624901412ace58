# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install the pinned, tested versions (requirements/constraints.txt).
# torch is installed first on its own: the CPU build where no NVIDIA GPU is present, so a CPU machine
# never downloads a multi-GB CUDA build.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= demo_out
STAMP := $(VENV)/.mosmos-installed

.PHONY: demo test test-avx2 install lint format clean

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch==$(TORCH_VERSION) (CUDA build)"; \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	else \
		echo "no NVIDIA GPU: installing torch==$(TORCH_VERSION) (CPU build)"; \
		$(PIP) install --retries 0 --timeout 15 "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PIP) install -c requirements/constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mosmos demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest

# ruff, then the import contracts of pyproject.toml (layers and no cycles) on the installed layout
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/lint_imports.py

# the numerics-sensitive tests again with AVX2 kernels forced (ATen and oneDNN), so a developer on an
# AVX-512 machine sees the roundings a newcomer's AVX2-only CPU gives
test-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -m "numerics and not slow and not gpu"

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
