# Everything a fresh clone needs: a virtual environment, the pinned dependencies, the package, the embedded servers.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint chaos install bench schemas lock clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/segmentation dev

# Two pytest workers (pytest-xdist), each with its own PostgreSQL and broker: most tests wait on servers, not CPU.
# A module stays on one worker (--dist loadfile): its module-scoped stack starts once.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# Every measure of the performance table beside the naive baselines of ../shared/bench; BENCH_ARGS e.g.
# "--workers 2 --relays 2". The read measure needs wrk (installed with apt-get when missing, as root).
# The long chaos run: every fault kind under load, judged by tests/chaos/invariants.py; prints the table.
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.run

bench: $(STAMP)
	@command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

schemas: $(STAMP)
	$(BIN)/segmentation export-schemas

# Refresh the pinned versions after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
