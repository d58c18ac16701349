# Set-up on a fresh machine: both targets create .venv if it is missing and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
LINT   := build/lint

.PHONY: run test test-fast lint install clean gpu-wheels gpu-check

install: $(STAMP)

# torch 2.13.0 first: it resolves to the local CPU build; a plain `torch` requirement with no
# torch installed would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m spectrum_xdit.launch.demo

# The layer contract (pyproject.toml, [tool.importlinter]) on the package as it installs:
# parallel/ and launch/ become spectrum_xdit.parallel and spectrum_xdit.launch.
lint: $(STAMP)
	rm -rf $(LINT) && mkdir -p $(LINT)
	cp -r spectrum_xdit $(LINT)/ && cp -r parallel launch $(LINT)/spectrum_xdit/
	cd $(LINT) && PYTHONPATH=. $(CURDIR)/$(VENV)/bin/lint-imports $(CURDIR)/pyproject.toml

test: lint
	$(PY) -m pytest -q

# The quick loop: everything but the multi-process and Ray tests (markers in pyproject.toml).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not distributed and not ray"

# A lent GPU machine (docs/gpu.md): `make gpu-wheels` here fetches the wheels its image lacks into
# .whl/; `make gpu-check` there (device tool, carry [".whl"]) installs them and runs the checks with
# the image's python3, from the source tree. Neither needs .venv there.
GPU_PYTHON ?= python3

gpu-wheels: $(STAMP)
	$(PY) -m benchmarks.gpu_wheels

gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_device $(GPU_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
