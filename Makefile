# aem — two commands do all the set-up on a fresh machine:
#   make run    installs what is needed and starts the main job
#   make test   installs what is needed and runs the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install system-deps lint typecheck bench clean build

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Debian packages the benchmarks and browser tests use (wrk, nginx, chromium).
system-deps:
	@scripts/install-system-deps.sh

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard src/aem/*.py src/aem/*/*.py src/aem/_core/*.[ch])
	$(PY) -m pip install --quiet '.[test,bench]'
	@touch $(STAMP)

install: system-deps $(STAMP)

build:  ## in-place build of the C core for development (PYTHONPATH=src)
	$(PY) setup.py --quiet build_ext --inplace

lint: install
	$(VENV)/bin/ruff check src tests

typecheck: install
	$(VENV)/bin/mypy

test: install lint typecheck
	cd tests && ../$(VENV)/bin/python -m pytest -q -p no:cacheprovider

run: install
	@echo "AEMhttpd: open http://127.0.0.1:8080/ (status page: http://127.0.0.1:8080/_aem/status); Ctrl-C stops it"
	$(VENV)/bin/aem serve --root demo-site --host 127.0.0.1 --port 8080 --status

bench: install
	$(VENV)/bin/aem bench

clean:
	rm -rf build dist *.egg-info src/*.egg-info $(VENV) src/aem/*.so
