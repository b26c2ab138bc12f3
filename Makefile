# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NODE_MODULES := tests/node_modules/.package-lock.json

.PHONY: run test lint mutation clean

# Reinstalled when the package list or the twist plugin changes (the plugin is read from site-packages too).
$(BIN)/.installed: setup.py $(wildcard twisted/plugins/*.py)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '.[test]'
	touch $@

$(NODE_MODULES): tests/package.json tests/package-lock.json
	npm ci --prefix tests --ignore-scripts --no-audit --no-fund --loglevel=error

## Serve downloads against $$COUCHDB_URL, or a local seeded PouchDB Server.
run: $(BIN)/.installed $(NODE_MODULES)
	$(BIN)/python -m couchtoken.dev.demo

## Install everything and run the whole test suite.
test: $(BIN)/.installed $(NODE_MODULES)
	$(BIN)/python -m pytest tests

lint: $(BIN)/.installed
	$(BIN)/ruff check couchtoken tests twisted benchmarks setup.py
	$(BIN)/ruff format --check couchtoken tests twisted benchmarks setup.py

## Mutation testing of the access rules (tokens, names, documents, cache).
mutation: $(BIN)/.installed
	$(BIN)/pip install --quiet 'mutmut==3.8.1'
	rm -rf mutants
	$(BIN)/mutmut run > .mutmut.log 2>&1 || (tail -c 3000 .mutmut.log; exit 1)
	$(BIN)/mutmut results
	$(BIN)/python tests/mutation_score.py .mutmut.log --minimum 95

clean:
	rm -rf $(VENV) tests/node_modules .pytest_cache mutants .mutmut.log
