# Two commands: `make demo` and `make test`. Both create or refresh .venv from this repo's files only;
# a second run installs nothing (the stamp is newer than pyproject.toml).
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
RUN := MUJOCO_GL=egl TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/python

.PHONY: demo test test-all venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(RUN) run_policy.py demo --json demo_out/results.json

test: $(STAMP)
	$(RUN) -m pytest -q

test-all: $(STAMP)
	$(RUN) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) demo_out .pytest_cache
