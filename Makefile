# Two entry points for a fresh machine:
#   make demo   install into .venv, then run pretrain -> SFT -> reward model -> PPO on the built-in tiny task (CPU)
#   make test   install into .venv (with test extras), then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 2
# Installs take the versions the suite last passed on (constraints.txt, written by `make lock`), so a new
# release on the registry cannot change a fresh clone's environment; upgrading is `make lock` + commit.
LOCK := constraints.txt
# -P: the repository root is not put on sys.path, so no folder there can stand in for an installed package.
PYTEST := $(BIN)/python -P -m pytest

.PHONY: install install-test demo rlvr test lint lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) --upgrade pip

# Stamps depend on pyproject.toml and the lock, so changed dependencies refresh the environment.
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q -c $(LOCK) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q -c $(LOCK) -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python scripts/pipeline.py --workdir runs/demo

# RL with verifiable rewards: pretrain -> SFT -> GRPO on the arithmetic task's checker (CPU, <= 15 minutes)
rlvr: install
	$(BIN)/python scripts/pipeline.py --recipe rlvr --workdir runs/rlvr

test: install-test
	$(PYTEST) -n $(PYTEST_WORKERS) --dist worksteal --durations=15 tests

# Refresh the lock: install the newest versions pyproject.toml allows into a scratch environment, run the
# whole suite there, and only if it passes write constraints.txt (commit it with the suite's result).
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q -e '.[test]'
	$(LOCK_VENV)/bin/pip freeze --all --exclude-editable > $(LOCK).new
	$(LOCK_VENV)/bin/python -P -m pytest -n $(PYTEST_WORKERS) --dist worksteal -q tests
	{ echo "# Versions the test suite last passed on (Linux x86_64, Python 3.11), written by \`make lock\`."; \
	  echo "# make install / install-test / demo / test install with pip -c $(LOCK)."; cat $(LOCK).new; } > $(LOCK)
	rm -f $(LOCK).new
	@echo "$(LOCK) refreshed; rerun 'make test' after 'rm -rf $(VENV)' and commit it"

lint: install-test
	$(BIN)/ruff check gptjax kernels scripts configs tests

clean:
	rm -rf $(VENV) $(LOCK_VENV) runs .pytest_cache
