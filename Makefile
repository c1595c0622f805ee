# Two commands matter: `make train` and `make test`. Everything else is a helper they share.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned pair that lies on this machine's disk; override for another CUDA/CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
STAMP := $(VENV)/.ppd-installed

.PHONY: install build train test ctest bench clean

# Install torch first, then the package (with its compiled extension) against that torch.
$(STAMP): pyproject.toml setup.py $(CSRC)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=69" wheel "ninja>=1.11" "pybind11>=2.12"
	$(PY) -m pip install -q $(TORCH_SPEC)
	PPD_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	$(MAKE) build
	@touch $@

install: $(STAMP)

# (Re)build the extension in place; a lock keeps parallel builds in one tree from clobbering
# each other's objects.
build:
	flock /tmp/ppd_engine_build.lock $(PY) setup.py build_ext --inplace

train: install
	$(PY) -m ppd_engine.train

test: install
	$(PY) -m pytest

ctest: install
	cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja
	cmake --build build-cmake -j $(MAX_JOBS)
	cd build-cmake && ctest --output-on-failure

bench: install
	$(PY) -m bench.run_suite --device cpu

clean:
	rm -rf build build-cmake ppd_engine/_C*.so
