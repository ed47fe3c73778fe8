# The two commands the README names: `make demo` and `make test`. Both install what is missing.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint typecheck pytest demo bench fuzz deb deb-check clean

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

# coverage-guided fuzzing (atheris) of every parser of outside bytes, FUZZ_SECONDS per target
# (FUZZ_RUNS=N: a target stops earlier once it has run N inputs); prints executions, coverage
# (cov/ft) and findings per target (tests/fuzz/run.py)
FUZZ_SECONDS ?= 60
fuzz: setup
	$(BIN)/python -m tests.fuzz.run --seconds $(FUZZ_SECONDS) $(if $(FUZZ_RUNS),--runs $(FUZZ_RUNS)) $(FUZZ_TARGETS)

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# the Debian package, dist/devid-agent_<version>_<arch>.deb (scripts/build-deb.sh says what is in it)
deb: setup
	@bash scripts/build-deb.sh dist

# install it on a fresh Debian 12 root (mmdebstrap, cached in .deps/), check it works, purge it
deb-check: deb
	@bash scripts/deb-check.sh dist/devid-agent_*.deb

clean:
	rm -rf $(VENV) .deps dist .mypy_cache .pytest_cache .ruff_cache .fuzz
