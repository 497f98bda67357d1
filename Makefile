# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test test-all check style dataset install install-dev clean offline-plots plots

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

# The embedded default: check -> prepare -> features -> ... -> evaluate -> export (Fashion-MNIST, ResNet-20, CPU).
demo: install dataset
	ptqflow check
	dvc repro
	ptqflow report

# The default test run (CPU, under 10 minutes); `make test-all` adds the tests marked slow.
# -n auto: one worker per usable core (tests/conftest.py); the cold pipeline run's tests go first, together.
XDIST := -n auto --dist loadfile --no-loadscope-reorder
test: install
	$(BIN)/python -m pytest -m "not slow" -q $(XDIST)

test-all: install
	$(BIN)/python -m pytest -q $(XDIST)

check: install
	$(BIN)/ruff check src stages tests bench
	$(BIN)/ruff format --check src stages tests bench
	$(BIN)/mypy

style: install
	$(BIN)/ruff check --fix src stages tests bench
	$(BIN)/ruff format src stages tests bench

# The demo's plots only (targets are regular expressions matched at the start of plot ids: file paths and
# the display plots' titles): a bare `dvc plots show` also collects the presets' and the training pipeline's plot
# definitions, whose files this checkout has not computed (a "failed to load" line and empty placeholders).
plots: install
	$(BIN)/dvc plots show plots/evaluate plots/reconstruct plots/timing "Mixed-precision Pareto front" \
	  "Reconstruction loss per unit" "Sensitivity per unit" "MRECG module capacity"

# `dvc plots show` offline: DVC's page loads Vega from a CDN; fetch the three packages once from the npm
# registry into .dvc/tmp (git-ignored) and point this clone's plots.html_template at a page that loads them.
PLOTS_JS := $(CURDIR)/.dvc/tmp/plots-offline
offline-plots: install
	mkdir -p $(PLOTS_JS)
	cd $(PLOTS_JS) && npm pack -s vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 >/dev/null && \
	  for t in vega-5.20.2 vega-lite-5.2.0 vega-embed-6.18.2; do \
	    mkdir -p $$t && tar xzf $$t.tgz -C $$t --strip-components=1; done
	printf '%s\n' '<!DOCTYPE html>' '<html><head><meta charset="utf-8"><title>DVC plots (offline)</title>' \
	  '<script src="file://$(PLOTS_JS)/vega-5.20.2/build/vega.min.js"></script>' \
	  '<script src="file://$(PLOTS_JS)/vega-lite-5.2.0/build/vega-lite.min.js"></script>' \
	  '<script src="file://$(PLOTS_JS)/vega-embed-6.18.2/build/vega-embed.min.js"></script>' \
	  '</head><body>{plot_divs}</body></html>' > $(PLOTS_JS)/index.html
	$(BIN)/dvc config --local plots.html_template $(PLOTS_JS)/index.html
	@echo "dvc plots show now renders offline (dvc_plots/index.html loads $(PLOTS_JS))"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
