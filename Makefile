# The two commands of the quick start: `make demo` and `make test`.
PYTHON ?= python3
DEMO_DIR ?= .demo

.PHONY: deps demo demo-down test unit bench

# Python packages (the project, editable, with its test extras), then the
# system packages of the test cluster (apt-get; needs root).
deps:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	$(PYTHON) -m imagesync.cluster install

# A three-node cluster on this machine, workers, beat and Flower; syncs once
# and leaves everything running. `make demo-down` stops it all.
demo: deps
	$(PYTHON) -m imagesync.cluster demo --dir $(DEMO_DIR)

demo-down:
	$(PYTHON) -m imagesync.cluster down --dir $(DEMO_DIR)

# Every test, the real-cluster ones included.
test: deps
	$(PYTHON) -m pytest -p no:cacheprovider

# Only the tests that need no servers.
unit:
	$(PYTHON) -m pytest -p no:cacheprovider -m 'not cluster'

bench: deps
	$(PYTHON) -m bench
