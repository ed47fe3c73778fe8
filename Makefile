# The two commands the README names: `make demo` and `make test`. Both install what is missing.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint typecheck pytest demo bench clean

setup:
	@bash scripts/setup.sh

lint: setup
	$(BIN)/ruff check agent hal tests bench
	$(BIN)/ruff format --check agent hal tests bench

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test: setup
	$(BIN)/ruff check agent hal tests bench
	$(BIN)/ruff format --check agent hal tests bench
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m tests.support.demo

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .deps .mypy_cache .pytest_cache .ruff_cache
