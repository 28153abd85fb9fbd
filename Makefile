# LowMag: two commands.  `make demo` runs the main job; `make test` runs lint + the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY := PASSIVE
export DJANGO_ALLOW_ASYNC_UNSAFE := true

.PHONY: setup demo test lint format clean frontend

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

frontend: frontend/dist/viewer.js

frontend/dist/viewer.js: frontend/package.json frontend/package-lock.json frontend/vite.config.js $(shell find frontend/src -type f 2>/dev/null)
	cd frontend && npm ci --no-audit --no-fund --loglevel=error && npm run build

demo: setup frontend
	$(BIN)/python manage.py demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy analysis client
	$(BIN)/mypy portal
	PYTHONPATH=. $(BIN)/lint-imports --no-cache

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup lint frontend
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
