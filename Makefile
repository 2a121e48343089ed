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

# Two workers, one test file each at a time (--dist loadfile keeps a file's ordered tests together):
# most of the slow tests wait on single-threaded process start-up and DVC. tests/conftest.py puts the
# slowest files first; --no-loadscope-reorder keeps that order (xdist would sort files by test count).
test: setup
	$(VENV)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=12

bench: setup
	$(VENV)/python bench/pipeline.py
	$(VENV)/python bench/throughput.py
	$(VENV)/python bench/loader.py
