# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test test-all check style dataset install install-dev clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev,export]'
	touch $@

install install-dev: $(BIN)/.installed

# Debian's Fashion-MNIST (the four IDX .gz files in /usr/share/datasets/fashion-mnist).
dataset:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

# The embedded default: prepare -> features -> quantize -> evaluate (Fashion-MNIST, ResNet-20, CPU).
demo: install dataset
	dvc repro
	dvc metrics show

# The default test run (CPU, under 10 minutes); `make test-all` adds the tests marked slow.
test: install
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install
	$(BIN)/python -m pytest -q

check: install
	$(BIN)/ruff check src stages tests bench
	$(BIN)/ruff format --check src stages tests bench
	$(BIN)/mypy

style: install
	$(BIN)/ruff check --fix src stages tests bench
	$(BIN)/ruff format src stages tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
