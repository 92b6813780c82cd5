# The two commands of the README: `make demo` and `make test`. Each creates the virtual
# environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: setup demo test lint clean

$(BIN)/eclip: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $(BIN)/eclip

setup: $(BIN)/eclip

demo: setup
	$(BIN)/eclip demo --out runs/demo $(DEMO_ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
	$(BIN)/ruff check src tests $(wildcard benchmarks)

lint: setup
	$(BIN)/ruff check src tests $(wildcard benchmarks)

clean:
	rm -rf $(VENV) runs .pytest_cache
