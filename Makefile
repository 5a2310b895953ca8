# aem — each target installs what it needs, and nothing more, in .venv:
#   make run     aem itself (and httptools): starts AEMhttpd; no root needed
#   make test    + the test, bench and docs extras and the Debian packages the
#                benchmarks use; then ruff, mypy --strict, the docs site, pytest;
#                then the event loop's tests on the other Pythons found (3.12, 3.13)
#   make bench   + the bench extra and those Debian packages; then aem bench
#   make docs    + the docs extra; the docs site (mkdocs, warnings are errors) into build/site
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml setup.py $(wildcard src/aem/*.py src/aem/*/*.py src/aem/_core/*.[ch] src/aem/*.pyi)

.PHONY: run test bench docs lint typecheck system-deps clean build

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per set of extras: `make run` never installs the test or bench ones.
EXTRAS_run :=
EXTRAS_test := [test,bench,docs]
EXTRAS_bench := [bench]
EXTRAS_docs := [docs]
$(VENV)/.installed-%: $(PY) $(SOURCES)
	$(PY) -m pip install --quiet '.$(EXTRAS_$*)'
	@touch $@

# Debian packages the benchmarks and browser tests use (wrk, nginx, chromium); needs root or sudo.
system-deps:
	@scripts/install-system-deps.sh

build:  ## in-place build of the C core for development (PYTHONPATH=src)
	$(PY) setup.py --quiet build_ext --inplace

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests

typecheck: $(VENV)/.installed-test
	$(VENV)/bin/mypy

MKDOCS := $(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

docs: $(VENV)/.installed-docs
	$(MKDOCS)

test: system-deps $(VENV)/.installed-test lint typecheck
	$(MKDOCS)
	cd tests && $(abspath $(VENV))/bin/python -m pytest -q -p no:cacheprovider
	scripts/test-other-pythons.sh

run: $(VENV)/.installed-run
	@echo "AEMhttpd: open http://127.0.0.1:8080/ (status page: http://127.0.0.1:8080/_aem/status); Ctrl-C stops it"
	$(VENV)/bin/aem serve --root demo-site --host 127.0.0.1 --port 8080 --status

bench: system-deps $(VENV)/.installed-bench
	$(VENV)/bin/aem bench

clean:
	rm -rf build dist *.egg-info src/*.egg-info $(VENV) .venv-3.* src/aem/*.so
