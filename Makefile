# Two entry points (README): `make demo` trains the demo, `make test` installs and runs the suite.
# Both create or reuse a virtual environment at $(VENV) pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rarl-installed
PIP_FLAGS := --disable-pip-version-check -q -c constraints.txt

.PHONY: venv trainers test lint demo gpu-check-dry clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) torch==2.13.0
	$(BIN)/pip install $(PIP_FLAGS) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The trainer releases the drop-in tests check besides the venv's own TRL (tests/data/trainer_releases.txt): their
# wheels, downloaded hash-checked into $(TRAINERS)/wheels, and TRL 1.12 installed alone into an overlay folder. When
# they cannot be fetched (no network), make goes on and those tests skip, saying so; the next make tries again.
TRAINERS := $(VENV)/trainers
$(TRAINERS)/.fetched: tests/data/trainer_releases.txt $(STAMP)
	rm -rf $(TRAINERS) && mkdir -p $(TRAINERS)
	( $(BIN)/pip download --disable-pip-version-check -q --no-deps --require-hashes -r $< -d $(TRAINERS)/wheels \
	  && $(BIN)/pip install --disable-pip-version-check -q --no-deps --no-index --target $(TRAINERS)/trl-1.12.0 \
	     $(TRAINERS)/wheels/trl-1.12.0-py3-none-any.whl \
	  && touch $@ ) || echo "make: the trainer releases could not be fetched; their drop-in tests will skip"

trainers: $(TRAINERS)/.fetched

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) trainers
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/rarl-fast demo --config configs/demo_cpu.yaml

gpu-check-dry: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash bench/gpu_check.sh --dry-run

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
