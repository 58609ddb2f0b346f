# Two entry points (README): `make demo` trains the demo, `make test` installs and runs the suite.
# Both create or reuse a virtual environment at $(VENV) pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rarl-installed
PIP_FLAGS := --disable-pip-version-check -q -c constraints.txt

.PHONY: venv test lint demo gpu-check-dry clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) torch==2.13.0
	$(BIN)/pip install $(PIP_FLAGS) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/rarl-fast demo --config configs/demo_cpu.yaml

gpu-check-dry: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash bench/gpu_check.sh --dry-run

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
