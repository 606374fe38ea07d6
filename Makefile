# The two commands of the README: `make run` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# llama-cpp-python (the `llm` extra) ships only an sdist: its wheel is compiled once (minutes)
# into this cache and installed from there by every later install, clean clones included.
CASCADE_WHEELHOUSE ?= $(HOME)/.cache/cascade/wheels
LLAMA_CPP_VERSION  := $(shell sed -n 's/.*"llama-cpp-python\[server\]==\([0-9.]*\)".*/\1/p' pyproject.toml)
LLAMA_CMAKE_ARGS   := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF

.PHONY: run test models bench soak lint clean help wheels

help:  ## show the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(MAKE) --no-print-directory wheels
	$(PY) -m pip install -q --find-links $(CASCADE_WHEELHOUSE) -e '.[build,test,bench,llm,ray]'
	touch $(STAMP)

# One build at a time: a second install (another clone, at once) waits on the lock and then finds
# the wheel. It is built in a scratch directory and renamed in, so no install reads a half-written
# wheel and a failed build leaves nothing behind.
wheels:  ## compile llama-cpp-python's wheel into the wheel cache once (minutes; then cached)
	@test -n "$(LLAMA_CPP_VERSION)" || (echo "no llama-cpp-python[server]==X pin in pyproject.toml" >&2; exit 1)
	@mkdir -p $(CASCADE_WHEELHOUSE)
	@flock $(CASCADE_WHEELHOUSE)/.build.lock sh -ec '\
	  wh=$$(cd $(CASCADE_WHEELHOUSE) && pwd); \
	  for w in "$$wh"/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl; do \
	    if [ -f "$$w" ]; then echo "cached: $$w"; exit 0; fi; done; \
	  tmp=$$(mktemp -d "$$wh/.build.XXXXXX"); trap "rm -rf \"$$tmp\"" EXIT; \
	  echo "compiling llama-cpp-python $(LLAMA_CPP_VERSION) into $$wh (minutes, once)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps \
	    llama-cpp-python==$(LLAMA_CPP_VERSION) -w "$$tmp"; \
	  mv "$$tmp"/llama_cpp_python-*.whl "$$wh"/'

models: $(STAMP)  ## build the model ladders into models/ (seconds when up to date)
	$(PY) -m cascade models build

run: models  ## set up everything and start the local four-tier chain
	$(PY) -m cascade up

test: models  ## install test deps and run the whole test suite
	$(PY) -m pytest -q -ra

bench: models  ## run the benchmark (writes reports/bench.json and reports/bench.md)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || true
	$(PY) -m cascade bench

soak:  ## the whole suite 10x and the fault suite 20x in a row, each loading the other (hours; .ci/soak --help)
	.ci/soak

lint: $(STAMP)  ## ruff, mypy --strict and the import-linter layer contracts (pyproject.toml); fails on findings
	$(PY) -m pip install -q -e '.[lint]'
	$(PY) -m ruff check cascade tests benchmarks
	$(PY) -m mypy cascade
	$(VENV)/bin/lint-imports

clean:  ## remove build output and local state (keeps the venv)
	rm -rf models var reports/*.json
