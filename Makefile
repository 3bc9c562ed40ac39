# Two commands on a fresh machine: `make demo` (the whole pipeline on the synthetic data) and `make test`.
# Both create .venv from requirements*.txt the first time.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DEMO := runs/demo

.PHONY: test demo bench study clean-demo

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) prepare_data.py shapes --out data/shapes --num_train 2000 --num_val 200
	$(PY) prepare_data.py shapes_video --out data/shapes_video --num_train 60 --num_val 10

bench: $(VENV)/.installed
	$(PY) bench.py

clean-demo:
	rm -rf $(DEMO)
