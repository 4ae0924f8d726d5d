# The few commands a newcomer needs. Every target works from any state: running one twice is harmless.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WEDBACKUP := $(BIN)/wedbackup
WEDDINGS ?= 60
SEED ?= 7
HEADLESS ?=
BENCH_QUICK ?=
LONG ?=
STAMP := $(VENV)/.installed

.PHONY: install stack-up stack-down demo dev test bench reliability validate clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

stack-up: install
	$(WEDBACKUP) stack up

stack-down:
	@if [ -x $(WEDBACKUP) ]; then $(WEDBACKUP) stack down; fi

# Backs up every wedding of a fresh demo database through Dagster, prints a summary, then leaves the
# Dagster UI on http://127.0.0.1:3000 (HEADLESS=1: stop after the summary).
demo: stack-up
	eval "$$($(WEDBACKUP) stack env)" && $(WEDBACKUP) demo --weddings $(WEDDINGS) --seed $(SEED) $(if $(HEADLESS),--headless,)

# The Dagster UI (webserver + daemon) on the running stack, in the foreground.
dev: stack-up
	eval "$$($(WEDBACKUP) stack env)" && $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# Loads the code location with nothing configured (a temporary Dagster home), as a fresh checkout would.
validate: install
	env -u DAGSTER_HOME $(BIN)/dagster definitions validate -w workspace.yaml

# The whole test suite against the real stack (started once for the session by the test fixtures).
# Debian's docker-compose validates deployments/docker-compose (`config` needs no Docker engine).
test: install validate
	@command -v docker-compose >/dev/null || { apt-get update -q && apt-get install -y -q docker-compose; }
	$(BIN)/pytest -q -n 2 --dist loadfile

bench: stack-up
	@command -v age >/dev/null || { apt-get update -q && apt-get install -y -q age zstd; }
	@command -v restic >/dev/null || { apt-get update -q && apt-get install -y -q restic; }
	eval "$$($(WEDBACKUP) stack env)" && $(BIN)/python -m benchmarks.run $(if $(BENCH_QUICK),--quick,)

# The seeded fault soak and the mutation loop (summaries as text and JSON in .wedbackup/reliability/).
# LONG=1: the long run, 1,000+ faults and 100,000 mutated archives and streams (README, Reliability).
reliability: stack-up
	eval "$$($(WEDBACKUP) stack env)" && $(if $(LONG),WEDBACKUP_RELIABILITY_LONG=1 ,)\
	  WEDBACKUP_RELIABILITY_OUT=$(CURDIR)/.wedbackup/reliability \
	  $(BIN)/pytest -q -m reliability wedbackup_dagster_tests/reliability

clean: stack-down
	rm -rf .wedbackup
