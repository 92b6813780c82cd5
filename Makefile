# The two commands of the README: `make demo` and `make test`. Each creates the virtual
# environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: setup demo test lint clean browser

$(BIN)/eclip: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $(BIN)/eclip

setup: $(BIN)/eclip

demo: setup
	$(BIN)/eclip demo --out runs/demo $(DEMO_ARGS)

# The web page test (tests/test_serve.py) screenshots the page in Debian's headless chromium:
# installed here once (a no-op when present). Not fatal: without root/sudo or apt the test skips
# and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: could not install chromium; the web page screenshot test will be skipped"

test: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
	$(BIN)/ruff check src tests $(wildcard benchmarks experiments)

lint: setup
	$(BIN)/ruff check src tests $(wildcard benchmarks experiments)

clean:
	rm -rf $(VENV) runs .pytest_cache
