# Bulwark: `make run` starts the fleet, `make test` runs the tests.
# Both set themselves up in .venv on first use.

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
            command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { command -v $$p; break; }; done)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test compiled lint format bench bench-stack bench-security clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Bulwark needs Python 3.11 or newer on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	# A current pip installs the project in 30 s, Python 3.11's own in 37 (upgrade: 5 s).
	$(BIN)/python -m pip install --quiet --upgrade pip
	# pip byte-compiles what it installs: keep it (with PYTHONDONTWRITEBYTECODE set, as on
	# CI, nothing else writes .pyc files and every process would compile its imports).
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

run: $(STAMP) compiled
	$(BIN)/bulwark up

# Four test processes, each with its own redis-server, Redis Cluster, sentinels and
# workers (pytest-xdist). Much of a test's time is waiting (a worker starting and
# stopping, a failover), so on the 2-core machines CI runs on four finish sooner than
# three; work stealing keeps the long failover tests from ending up on one process
# (215 s of tests on 2026-11-30, against 265 s with three and the default distribution).
test: $(STAMP) compiled
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -n 4 --dist worksteal $(PYTEST_ARGS)

# The project's own .pyc files, written here once: with PYTHONDONTWRITEBYTECODE set (as
# on CI) Python writes none, and each of the hundreds of processes the tests start would
# compile Bulwark again (0.2 s each). The tests run with it unset, so that pytest keeps
# its rewritten test modules (7 s of each test process's collection) for the next run.
compiled: $(STAMP)
	@$(BIN)/python -m compileall -q policies workers tasks tests bench >/dev/null

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Figures, not tests: each prints ratios against a reference measured in the same run.
bench: $(STAMP)
	$(BIN)/python bench/policies_overhead.py

bench-stack: $(STAMP)
	$(BIN)/python bench/stack_overhead.py --pools prefork --bodies noop

bench-security: $(STAMP)
	$(BIN)/python bench/security_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
