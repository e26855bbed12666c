# Everything a newcomer needs: `make run` and `make test`. Both install into .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
HOST ?= 0.0.0.0
# Below Kubernetes' default 30 s termination grace period.
GRACEFUL_TIMEOUT ?= 20

.PHONY: install run test lint format bench bench-postgres image-test clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert (3, 11) <= sys.version_info[:2] < (3, 13), "Python 3.11 or 3.12 is required (uniflow needs < 3.13)"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/uvicorn app.main:app --http app.protocol:HttpProtocol --host $(HOST) --port $(PORT) \
		--timeout-graceful-shutdown $(GRACEFUL_TIMEOUT)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# By hand, never in CI: needs wrk (apt-get install wrk) and a quiet machine; see the README.
bench: install
	$(BIN)/python -m bench.run

# The same, in PostgreSQL mode with one and two replicas; needs a local PostgreSQL as well.
bench-postgres: install
	$(BIN)/python -m bench.postgres

# Builds the image with podman (no Docker engine needed) and checks it as the README uses it;
# needs root and podman, runc, debootstrap (see deploy/image-test.py). Runs in CI.
image-test:
	$(PYTHON) deploy/image-test.py

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
