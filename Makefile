# Two entry points: `make run` (the main job, toy scale) and `make test` (the test suite).
# Both create the pinned environment in .venv first if it is missing or older than the lock.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-from-lock
CORES ?= all

.PHONY: env run test test-fast lock clean

env: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

run: env
	$(BIN)/snakemake --cores $(CORES) results/table4.csv

test: env
	$(BIN)/python -m pytest

test-fast: env
	$(BIN)/python -m pytest -m "not slow"

# Re-resolve the pins from requirements.in (then commit requirements.lock).
lock:
	rm -rf build/lockenv && $(PYTHON) -m venv build/lockenv
	build/lockenv/bin/pip install --quiet -r requirements.in
	build/lockenv/bin/pip freeze --exclude-editable | sort -f > requirements.lock

clean:
	rm -rf .snakemake results/raw results/logs results/benchmarks results/table*.csv

# Container images (as root): installs podman, runc and debootstrap when missing, then builds the
# base and every stage image under its content tag (containers/README.md).
.PHONY: containers
containers: env
	$(BIN)/python containers/build.py build
