# The two commands of the quick start: `make demo` and `make test`.
#
# Everything runs from a virtual environment, .venv: a stock Debian 12 marks
# its system Python externally managed (PEP 668) and refuses `pip install`
# into it. The venv is made with the system's python3; python3-venv is
# installed with apt-get when Debian's python3 lacks it.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO_DIR ?= .demo

.PHONY: deps venv demo demo-down test unit lint bench

venv: $(PYTHON)

$(PYTHON):
	@command -v python3 >/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3; }
	@python3 -m venv $(VENV) 2>/dev/null || { \
		rm -rf $(VENV); \
		echo "python3 -m venv needs python3-venv: installing it with apt-get"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv && python3 -m venv $(VENV); }
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --upgrade pip

# Python packages (the project, editable, with its test extras) into the venv,
# then the system packages of the test cluster (apt-get; needs root).
deps: $(PYTHON)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(PYTHON) -m testcluster install

# A three-node cluster on this machine, workers, beat and Flower; syncs once
# and leaves everything running. `make demo-down` stops it all.
demo: deps
	$(PYTHON) -m testcluster demo --dir $(DEMO_DIR)

demo-down: $(PYTHON)
	$(PYTHON) -m testcluster down --dir $(DEMO_DIR)

# Every test, the real-cluster ones included. Four tests at a time (pytest-xdist): a
# cluster test mostly waits on its servers, so four fit on two cores. The tests of a
# module with a module fixture stay together, in one process (tests/conftest.py); the
# slowest go first.
TEST_PROCESSES ?= 4
test: deps
	$(PYTHON) -m pytest -p no:cacheprovider -n $(TEST_PROCESSES) --dist loadscope --no-loadscope-reorder \
		--durations=15 -rs

# Only the tests that need no servers (starting one there is an error), on both cores.
unit: deps
	$(PYTHON) -m pytest -p no:cacheprovider -m 'not cluster' -n 2

# The style checks and the layers' contract (also checked by tests/test_layers.py).
lint: deps
	$(VENV)/bin/ruff check imagesync tests bench testcluster
	$(VENV)/bin/lint-imports --no-cache

bench: deps
	$(PYTHON) -m bench
