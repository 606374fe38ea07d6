# The two commands of the README: `make run` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test models bench lint clean help

help:  ## show the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[build,test,bench]'
	touch $(STAMP)

models: $(STAMP)  ## build the model ladders into models/ (seconds when up to date)
	$(PY) -m cascade models build

run: models  ## set up everything and start the local four-tier chain
	$(PY) -m cascade up

test: models  ## install test deps and run the whole test suite
	$(PY) -m pytest -q -ra

bench: models  ## run the benchmark (writes reports/bench.json and reports/bench.md)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || true
	$(PY) -m cascade bench

lint: $(STAMP)  ## ruff, mypy --strict and the import-linter layer contracts (pyproject.toml); fails on findings
	$(PY) -m pip install -q -e '.[lint]'
	$(PY) -m ruff check cascade tests benchmarks
	$(PY) -m mypy cascade
	$(VENV)/bin/lint-imports

clean:  ## remove build output and local state (keeps the venv)
	rm -rf models var reports/*.json
