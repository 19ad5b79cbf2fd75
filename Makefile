# Two entry points for a fresh machine:
#   make demo   install into .venv, then run pretrain -> SFT -> reward model -> PPO on the built-in tiny task (CPU)
#   make test   install into .venv (with test extras), then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 2

.PHONY: install install-test demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamps depend on pyproject.toml, so changed dependencies refresh the environment.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python scripts/pipeline.py --workdir runs/demo

test: install-test
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal --durations=15 tests

lint: install-test
	$(BIN)/ruff check gptjax kernels scripts configs tests

clean:
	rm -rf $(VENV) runs .pytest_cache
