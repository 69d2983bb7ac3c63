# Two entry points (see README): `make test` and `make demo`. Both create the venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-gpu demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[ci,test,train]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	CI=$${CI:-true} $(PY) -m pytest -q -m "not gpu" -p no:cacheprovider

# natsl vs pure linear vs full attention vs a layer hybrid on MQAR, tiny models on the CPU (README "Demo")
demo: $(STAMP)
	$(VENV)/bin/natsl train --task mqar --seq-len 128 --num-kv-pairs 8 --vocab 64 --block-size 16 \
		--models natsl,linear,softmax,layer_hybrid --steps 600 --batch-size 16 --lr 6e-3 --router-budget 0.15 \
		--eval-every 50 --threads 1 --device cpu --out runs/demo

test-gpu: $(STAMP)
	NATSL_TEST_DEVICE=cuda $(PY) -m pytest -q -m gpu tests/gpu

clean:
	rm -rf $(VENV) .hypothesis .pytest_cache
