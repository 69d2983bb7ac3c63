# Two entry points (see README): `make test` and `make demo`. Both create the venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[ci,test,train]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	CI=$${CI:-true} $(PY) -m pytest -q -m "not gpu" -p no:cacheprovider

test-gpu: $(STAMP)
	NATSL_TEST_DEVICE=cuda $(PY) -m pytest -q -m gpu tests/gpu

clean:
	rm -rf $(VENV) .hypothesis .pytest_cache
