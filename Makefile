# Everything a fresh clone needs: a virtual environment, the pinned dependencies, the package, the embedded servers.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMTOOL := $(BIN)/promtool

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

lint: $(STAMP) $(PROMTOOL)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(PROMTOOL) check config deploy/prometheus/prometheus.yml
	$(PROMTOOL) check rules deploy/prometheus/alerts.yml
	$(PROMTOOL) test rules deploy/prometheus/alerts_test.yml

# promtool, for the alert rules: from Debian's prometheus package, unpacked into the venv (the server is not installed).
$(PROMTOOL): | $(STAMP)
	@command -v apt-get >/dev/null && command -v dpkg >/dev/null || { echo "make: promtool comes from Debian's" \
	  "prometheus package (apt-get download + dpkg -x) and this machine has no apt-get/dpkg: put a promtool" \
	  "binary at $(PROMTOOL) by hand" >&2; exit 1; }
	rm -rf $(VENV)/prometheus-deb && mkdir -p $(VENV)/prometheus-deb
	cd $(VENV)/prometheus-deb && { apt-get download -qq prometheus 2>/dev/null || { apt-get update -qq && \
	  apt-get download -qq prometheus; } || { echo "make: apt-get download prometheus failed (see above)" >&2; exit 1; }; }
	dpkg -x $(VENV)/prometheus-deb/prometheus_*.deb $(VENV)/prometheus-deb/root
	mv $(VENV)/prometheus-deb/root/usr/bin/promtool $(PROMTOOL)
	rm -rf $(VENV)/prometheus-deb
	$(PROMTOOL) --version | head -1

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
