# Two commands for a newcomer: `make run` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# The stages run with this venv's Python (bin/stage, dvc.yaml's command, reads it).
export PIPELINE_PYTHON := $(abspath $(BIN))/python

.PHONY: run test test-fast faults install install-dev lint clean-venv

# Reinstall whenever pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed
install-dev: $(BIN)/.installed-dev

## run: install, check DVC's outputs and state (verify --repair), reproduce with DVC, say where results are
run: install
	$(BIN)/python -m pipeline verify --repair
	$(BIN)/dvc repro
	@echo
	@echo "Outputs (paths from params.yaml):"
	@$(BIN)/python -m pipeline outputs

## test: install with dev extras and run the test suite on TEST_WORKERS workers
# (much of the suite waits on servers, DVC and process start-up, so two workers gain on
# two cores). Tests go out one by one, longest first (tests/conftest.py); a module whose
# tests share an expensive fixture is marked one_worker and goes whole to one worker.
TEST_WORKERS ?= 2
test: install-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --no-loadscope-reorder

## test-fast: the suite without the slow and fault tests, for the edit-test loop (CI and
# `make test` still run everything)
test-fast: install-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --no-loadscope-reorder -m "not slow and not faults"

## faults: the whole fault-injection suite at the trial counts RELIABILITY.md reports, one
# process (about 25 min on two cores); FAULTS_ARGS adds pytest options, e.g. a shuffled order:
# make faults FAULTS_ARGS="-p randomly --randomly-seed=7"
FAULTS_ARGS ?=
faults: install-dev
	rm -f logs/faults/results.jsonl
	start=$$(date +%s); \
	PATH="$(CURDIR)/$(BIN):$$PATH" PIPELINE_FAULTS=full PIPELINE_FAULTS_RESULTS=$(CURDIR)/logs/faults/results.jsonl \
		$(BIN)/python -m pytest -m faults $(FAULTS_ARGS); status=$$?; \
	$(BIN)/python -m tests.support.faults_summary logs/faults/results.jsonl --wall-s $$(( $$(date +%s) - start )); \
	exit $$status

lint: install-dev
	$(BIN)/ruff check pipeline flows tests

clean-venv:
	rm -rf $(VENV)
