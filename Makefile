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

# The whole job on the synthetic data, CPU-sized (about 20 minutes on 2 cores): easy data, VQ and MSF VAEs, Slot
# Attention with the mixture decoder over each one's guidance, evaluation table and runs/demo/summary.json.
demo: $(VENV)/.installed
	$(PY) study.py demo

# The study (VQ/grouped/MSF guidance x 3 seeds, separability, Table 5 ablations, STEVE): hours on a CPU.
study: $(VENV)/.installed
	$(PY) study.py full

bench: $(VENV)/.installed
	$(PY) bench.py

clean-demo:
	rm -rf $(DEMO)
