# One virtualenv, created and filled on first use by any target that needs it.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch pinned to the CPU wheel on a fresh machine; see README "Install" for GPU machines.
TORCH ?= torch==2.13.0

.PHONY: install test test-fast train sweep eval bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q '$(TORCH)' -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf outputs multirun .pytest_cache .benchmarks
