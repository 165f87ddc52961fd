# The two commands of the README: `make demo` (set up, build, run the main job) and `make test`.
# Everything lives in .venv; nothing is installed outside it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch (on this project's machines it is on disk); override for other builds.
TORCH_SPEC ?= torch==2.13.0
DEPS := numpy tqdm matplotlib scikit-learn ninja pybind11 setuptools wheel pytest pytest-benchmark hypothesis expecttest

.PHONY: setup build test demo bench clean sanitize

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(DEPS)
	touch $@

setup: $(VENV)/.deps

# Builds l2l_fast._C in place (incremental through ninja).
build: setup
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q tests

# The shared MNIST beside the checkout is used when present (no download needed).
DATA ?= $(wildcard ../shared/datasets)
demo: build
	L2L_FAST_DATA=$${L2L_FAST_DATA:-$(DATA)} $(PY) -m l2l_fast.cli demo

bench: build
	$(PY) benchmarks/bench_step.py --markdown

clean:
	rm -rf build *.egg-info l2l_fast/_C*.so

# Developer check: the kernels built with -fsanitize=address,undefined (scripts/sanitize.sh).
sanitize:
	bash scripts/sanitize.sh
