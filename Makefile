# Two commands do all set-up: `make demo` (the main job on real data) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# real data: $COMTIP_DATA_DIR, else ../shared/data when it exists
SHARED_DATA := $(abspath ../shared/data)
COMTIP_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
export COMTIP_DATA_DIR
export MPLBACKEND ?= agg
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install test lint demo docs docs-notebooks benchmarks clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test,wsi]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

demo: install
	$(VENV)/bin/comtip demo --out demo_out

$(VENV)/.installed-doc: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[doc]"
	touch $@

docs: $(VENV)/.installed-doc
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

docs-notebooks: install
	$(PY) tutorials/run_notebooks.py

clean:
	rm -rf $(VENV) docs/_build demo_out .pytest_cache .ruff_cache
