# make demo      : set up .venv and run the bundled demo end to end (train -> evaluate -> export -> ONNX evaluation)
# make test      : set up .venv, lint, and run the whole test suite
# make test-fast : the unit tier only (no end-to-end training, no worker launches, no C++ build)
# make lint      : ruff (lint + import order)
# make bench     : this machine's figures per backbone (a few minutes on 2 cores; outputs/bench.json)
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# Re-installs whenever requirements.txt changes; a half-finished install leaves no stamp.
$(STAMP): requirements.txt
	@test -x $(PYTHON) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch $(STAMP)

demo: install
	PYTHON=$(PYTHON) bash scripts/run_demo.sh

lint: install
	$(PYTHON) -m ruff check .

test: lint
	$(PYTHON) -m pytest -q tests

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not dist and not cpp" tests

bench: install
	mkdir -p outputs
	$(PYTHON) bench/run.py --json outputs/bench.json

clean:
	rm -rf outputs/demo demo_data .pytest_cache
