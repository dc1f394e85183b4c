# Sandman: the two commands a fresh Debian/Ubuntu machine (as root) needs.
#   make run    set everything up, then run the gateway with state under ./state
#   make test   set everything up, then run every test (unit, lint, end-to-end)
# The other targets are the steps they are made of; make soak is the long soak alone.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STATE  ?= $(CURDIR)/state
PYTEST_ARGS ?=
SOAK_CYCLES ?= 1000
# make run's API port: API_PORT=9000 make run, or SANDMAN_PORT as the gateway reads it
API_PORT ?= $(or $(SANDMAN_PORT),8080)

.PHONY: run test setup host venv images unit e2e soak lint bench clean

run: setup images
	@echo "Sandman: API on http://127.0.0.1:$(API_PORT); its token is in $(STATE)/api-token (made on first start). Next, in another terminal:"
	@echo "  $(BIN)/sandman login --url http://127.0.0.1:$(API_PORT) --token-file $(STATE)/api-token"
	@echo "  $(BIN)/sandman session create user123 && $(BIN)/sandman session ssh user123"
	@echo "  Plain ssh: keep the host CA in its own file, not in ~/.ssh/known_hosts (README.md, First login):"
	@echo "  mkdir -p ~/.ssh/sandman && curl -s localhost:$(API_PORT)/ssh/known_hosts > ~/.ssh/sandman/known_hosts"
	@echo "  and at the top of ~/.ssh/config:"
	@echo "    Host localhost 127.0.0.1"
	@echo "        UserKnownHostsFile ~/.ssh/known_hosts ~/.ssh/sandman/known_hosts"
	@echo "  Ctrl-C stops the gateway; sessions stay."
	$(BIN)/sandman serve --port $(API_PORT) --state-dir $(STATE) --workspace-root $(STATE)/workspaces \
	    --ssh-host-alias 127.0.0.1 --ssh-host-alias localhost

test: setup images lint
	$(BIN)/pytest -ra --durations=15 $(PYTEST_ARGS) tests

setup: host venv

host:
	bash scripts/setup-docker.sh
	bash scripts/setup-host.sh

venv: $(BIN)/sandman

$(BIN)/sandman: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

images: venv
	bash scripts/build-images.sh

unit: venv
	$(BIN)/pytest -ra $(PYTEST_ARGS) tests/unit

e2e: setup images
	$(BIN)/pytest -ra $(PYTEST_ARGS) tests/e2e

soak: setup images
	SANDMAN_SOAK_CYCLES=$(SOAK_CYCLES) $(BIN)/pytest -ra -s $(PYTEST_ARGS) tests/e2e/test_load.py -k soak

lint: venv
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/ruff check --target-version py310 workspace-image/session/sandman-session \
	    workspace-image/session/sandman-control
	$(BIN)/ruff format --check workspace-image/session/sandman-session \
	    workspace-image/session/sandman-control

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(STATE) .pytest_cache .ruff_cache
