# make demo : set up .venv and run the bundled demo end to end (train -> evaluate)
# make test : set up .venv and run the whole test suite
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: install demo test clean

install: $(STAMP)

# Re-installs whenever requirements.txt changes; a half-finished install leaves no stamp.
$(STAMP): requirements.txt
	@test -x $(PYTHON) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch $(STAMP)

demo: install
	PYTHON=$(PYTHON) bash scripts/run_demo.sh

test: install
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf outputs/demo demo_data .pytest_cache
