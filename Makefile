# Every user-facing target does its own set-up: a virtualenv in $(VENV), the project installed
# into it, and the offline assets (SmolLM2-135M, evaluation sets) prepared in the user cache.
PYTHON ?= python3
VENV ?= .venv
OUT ?= results/demo
SUITE ?= configs/suites/demo.yaml
BENCH_OUT ?= results/bench
SET ?=
BIN := $(VENV)/bin

.PHONY: setup assets demo bench test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

assets: setup
	$(BIN)/bayeslora assets

demo: assets
	$(BIN)/bayeslora run $(SUITE) --out $(OUT) $(foreach kv,$(SET),--set $(kv))
	$(BIN)/bayeslora leaderboard $(OUT)
	$(BIN)/bayeslora report $(OUT) -o $(OUT)/report.html

bench: assets
	$(BIN)/bayeslora run configs/suites/bench.yaml --out $(BENCH_OUT) $(foreach kv,$(SET),--set $(kv))
	$(BIN)/bayeslora leaderboard $(BENCH_OUT)
	$(BIN)/bayeslora report $(BENCH_OUT) -o $(BENCH_OUT)/report.html

test: assets
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

lint: setup
	$(BIN)/ruff check bayeslora baselines benchmarks tests

clean:
	rm -rf $(VENV) results .pytest_cache
