# Lifeboat. Two commands for a newcomer:
#   make run    the portal with a working demo on embedded defaults (http://127.0.0.1:8000)
#   make test   installs what the tests need and runs the whole suite (PostgreSQL + Redis)

SHELL := /bin/bash
PYTHON ?= $(shell bash scripts/find-python.sh)
VENV := .venv
PY := $(VENV)/bin/python
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/lifeboat
TEST_BROKER_URL ?= redis://127.0.0.1:6379/15
TEST_ENV := DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL)
PYTEST_ARGS ?=

.PHONY: install peers run test bench check clean

$(VENV)/.installed: requirements.txt
	@if [ -z "$(PYTHON)" ]; then bash scripts/find-python.sh; exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed node_modules/.installed

peers: install
	bash scripts/install-peers.sh

# The demo runs on the embedded default keys (LIFEBOAT_DEMO=1); production refuses them.
run: export LIFEBOAT_DEMO = 1
run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py lifeboat_demo
	$(PY) scripts/run.py

# The checks run as production would (DEBUG off), with keys made up for the check only;
# docker compose needs them too, since it refuses to run without them.
check: export SECRET_KEY = make-check-only-signing-key-not-for-use-0123456789
check: export LIFEBOAT_SECRETS_KEY = make-check-only-secrets-key-not-for-use-0123456789
check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(TEST_ENV) $(PY) manage.py check --fail-level WARNING
	$(TEST_ENV) $(PY) manage.py makemigrations --check --dry-run
	$(TEST_ENV) $(PY) manage.py spectacular --validate --fail-on-warn --file /dev/null
	if docker compose version >/dev/null 2>&1; then docker compose config -q; else docker-compose config -q; fi

test: peers check
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_replication.py
	$(PY) bench/bench_rto.py
	$(PY) bench/bench_resync.py
	$(PY) bench/bench_plan_rto.py
	$(PY) bench/bench_failback.py
	$(PY) bench/bench_rpo_load.py
	$(PY) bench/bench_control_plane.py

clean:
	rm -rf var build staticfiles
