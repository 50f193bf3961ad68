# Newcomer entry points: `make demo` (set up + run the offline CPU demo), `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export WANDB_MODE ?= offline

.PHONY: setup demo test test-slow bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-cpu.txt requirements-offline.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q --no-deps -r requirements-offline.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: setup
	$(BIN)/attninf +experiment=demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs multirun outputs
