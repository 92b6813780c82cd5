# The two commands of the README: `make demo` and `make test`. Each creates the virtual
# environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: setup demo test lint clean constraints

# the exact versions of constraints.txt; pyproject.toml holds the ranges a plain pip install takes
$(BIN)/eclip: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(BIN)/eclip

setup: $(BIN)/eclip

demo: setup
	$(BIN)/eclip demo --out runs/demo $(DEMO_ARGS)

# The web page test (tests/test_serve.py) screenshots the page in a headless chromium when one
# is on the PATH and skips, saying why, when none is (the README's Install section says how to
# get one); nothing here installs system packages.
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
	$(BIN)/ruff check src tests $(wildcard benchmarks experiments)

lint: setup
	$(BIN)/ruff check src tests $(wildcard benchmarks experiments)

# after upgrading packages in .venv: record their exact versions (all of .venv is the project's)
constraints: setup
	{ echo "# Exact versions eclip is tested with: pip freeze of the .venv of make setup (make constraints)."; \
	  $(BIN)/pip freeze --exclude-editable; } > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
