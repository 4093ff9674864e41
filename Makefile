# The two set-up commands of the README, and the benchmark.
#   make run    create .venv, install crossroads, serve the chat example on http://127.0.0.1:8000/
#   make test   create .venv, install the test extras and system servers, run every test
#   make bench  the channel-layer, worker, web, MQTT, email, Slack, cross-protocol chat and failover benchmarks (docs/benchmarks.md)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_ARGS ?=

.PHONY: run test lint bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "crossroads needs Python 3.11 or newer: set PYTHON=python3.11 (or newer) and run make again")'
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ]; then apt-get update -q && apt-get install -y -q python3-venv; \
	  else echo "Python's venv module is missing: run 'sudo apt-get install -y python3-venv', then make again" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamps: reinstall only when setup.cfg changes.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/crossroads run --config examples/chat/crossroads.toml $(RUN_ARGS)

test: $(VENV)/.installed-test
	bash tests/system-packages.sh
	$(BIN)/ruff check .
	$(BIN)/python tests/lint_imports.py
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-bench
	bash tests/system-packages.sh
	$(BIN)/python bench/layer.py
	$(BIN)/python bench/worker.py
	$(BIN)/python bench/web.py
	$(BIN)/python bench/django_views.py
	$(BIN)/python bench/mqtt.py
	$(BIN)/python bench/mail.py
	$(BIN)/python bench/slack.py
	$(BIN)/python bench/chat.py
	$(BIN)/python bench/failover.py

clean:
	rm -rf $(VENV) .bench-venvs .pytest_cache .ruff_cache *.egg-info
