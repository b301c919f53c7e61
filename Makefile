# make demo      : set up .venv and run the bundled demo end to end (train -> evaluate -> export -> ONNX evaluation)
# make test      : set up .venv, lint, and run the whole test suite
# make test-fast : the unit tier only (no end-to-end training, no worker launches, no inference-app build)
# make lint      : ruff (lint + import order)
# make bench     : this machine's figures per backbone (a few minutes on 2 cores; outputs/bench.json), and
#                  beside PyTorch when .venv-bench exists
# make bench-torch: a separate PyTorch environment (.venv-bench; never part of requirements.txt or CI),
#                  then our r18/r50 training and inference beside PyTorch's, alternating in one run
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
ONEDNN_HEADERS := onednn-devel==2026.1.0

.PHONY: install demo test test-fast lint bench bench-torch clean

install: $(STAMP)

# Re-installs whenever requirements.txt changes; a half-finished install leaves no stamp.
$(STAMP): requirements.txt Makefile
	@test -x $(PYTHON) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	# oneDNN's C headers alone (no library: the CPU training convolutions of src/models/cpu_ops.py use
	# MindSpore's own oneDNN); --no-deps keeps the package's runtime out
	$(PYTHON) -m pip install --disable-pip-version-check -q --no-deps $(ONEDNN_HEADERS)
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

BENCH_VENV := .venv-bench
TORCH_VERSION ?= 2.13.0

bench-torch: install
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON_BOOTSTRAP) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --disable-pip-version-check -q torch==$(TORCH_VERSION) "numpy>=1.26,<2"
	mkdir -p outputs
	$(PYTHON) bench/train_speed.py --networks r18,r50 --torch $(BENCH_VENV)/bin/python --json outputs/bench_torch.json

clean:
	rm -rf outputs/demo demo_data .pytest_cache
