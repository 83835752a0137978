# exprune-fx: `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment on first use. Installs go through constraints.txt,
# which pins the CPU build of torch so that no resolve ever pulls CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install data test demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# The main job: calibrate the shipped ResNet-style CNN on Fashion-MNIST (about 2 min on 2 cores).
demo: $(STAMP) data
	$(VENV)/bin/exprune-fx demo --out demo-out

# Real data for the demo and the benchmarks: Debian's Fashion-MNIST package (root for apt-get).
data:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "run 'apt-get install dataset-fashion-mnist' as root for the benchmarks"; exit 1; fi; }

bench: $(STAMP) data
	$(PY) benchmarks/run.py --out bench-out

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache .hypothesis
