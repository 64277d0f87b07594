# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# PYTHON and VENV, given on the command line, pick another interpreter and its venv: .ci/run
# runs tests again on Debian's python3 with `make pytest PYTHON=/usr/bin/python3
# VENV=.venv-system`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test pytest lint typecheck bench fuzz clean bytecode

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# editable_mode=compat: the install's .pth puts the source tree on sys.path. setuptools'
# default for this flat layout is a finder that a .pth imports at every interpreter start
# (with pathlib, importlib.util, re, fnmatch): 15 ms of each `peerpost` command and of
# `python -c pass` (27 -> 12 ms here). A PYTHONPATH still comes first.
EDITABLE := --config-settings editable_mode=compat

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e . $(EDITABLE)
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]' $(EDITABLE)
	touch $@ $(VENV)/.installed

# The packages' bytecode, written ahead of use: where PYTHONDONTWRITEBYTECODE is set, every
# command and node would otherwise compile them from source at each start (a CLI command
# took 70 ms here instead of 50). compileall skips files that are up to date.
bytecode: $(VENV)/.installed
	$(BIN)/python -m compileall -q crypto rendezvous overlay sim

demo: $(VENV)/.installed bytecode
	$(BIN)/peerpost demo

test: $(VENV)/.installed-test bytecode
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=20

# pytest alone, on PYTEST_ARGS (test paths and options; none runs the whole suite).
PYTEST_ARGS ?=
pytest: $(VENV)/.installed-test bytecode
	$(BIN)/python -m pytest $(PYTEST_ARGS)

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks all

# Every decoder under atheris, one after another: FUZZ_RUNS inputs each (`make test` runs a
# short pass of the same targets).
FUZZ_RUNS ?= 1000000
fuzz: $(VENV)/.installed-test
	$(BIN)/python -m tests.fuzz.driver --runs $(FUZZ_RUNS)

clean:
	rm -rf $(VENV) .venv-system build *.egg-info .pytest_cache .ruff_cache .mypy_cache results
