# The two commands a newcomer needs are `make demo` and `make test`; everything else is a step of those.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test unit install up down status clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lake]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/branchline infra up

down: install
	$(BIN)/branchline infra down

status: install
	$(BIN)/branchline infra status

# The main job: bring up the local stack, load the sample ERP and CRM data, replicate them with
# `branchline run` while a churn workload runs for a minute (live screen: events/s, lag, position per
# table), then `branchline verify`: exits non-zero when source and target differ. Re-runnable.
# DEMO_CHURN_SECONDS=10 shortens the churn; infra/demo.py lists the other knobs.
demo: up
	$(BIN)/python -m branchline.infra.demo examples/pipeline.yaml

# Installs and starts everything the tests need, then runs unit and integration tests.
test: up
	$(BIN)/pytest tests

unit: install
	$(BIN)/pytest tests/unit

clean: down
	rm -rf .branchline
