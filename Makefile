# `make repro`: set up .venv and run the whole pipeline on the embedded default, then print
# the results table. `make test`: set up .venv and run the test suite (what .ci/run calls).
SHELL := /bin/bash
export DVC_NO_ANALYTICS := 1
# dvc.yaml runs `python`: it must be the venv's.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
VENV := .venv/bin

.PHONY: setup repro test bench
setup:
	./scripts/setup.sh

repro: setup
	$(VENV)/dvc repro
	@cat reports/results.md

# Two workers (most of the slow tests wait on single-threaded process start-up and DVC). --dist
# loadgroup with the groups tests/conftest.py gives: a file's ordered tests stay together, as under
# --dist loadfile, but the slowest units start first and each quick benchmark is a unit of its own;
# --no-loadscope-reorder keeps that order (xdist would sort units by their number of tests).
test: setup
	$(VENV)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

bench: setup
	$(VENV)/python bench/pipeline.py
	$(VENV)/python bench/kd_gain.py
	$(VENV)/python bench/throughput.py
	$(VENV)/python bench/loader.py
