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

# The whole job on the synthetic data, CPU-sized: data, VQ and MSF VAEs, SLATE with each, evaluation table.
demo: $(VENV)/.installed
	$(PY) study.py demo

# The study (SLATE VQ/grouped/MSF x 3 seeds, separability, Table 5 ablations, STEVE); GPU-sized.
study: $(VENV)/.installed
	$(PY) study.py full

bench: $(VENV)/.installed
	$(PY) bench.py

clean-demo:
	rm -rf $(DEMO)
