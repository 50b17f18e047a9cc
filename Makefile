# Two entry points for a fresh machine; both create .venv (Python >= 3.12) on first use.
.PHONY: train test setup
ARGS ?=

setup:
	@./scripts/bootstrap.sh

train: setup
	.venv/bin/python train.py $(ARGS)

test: setup
	.venv/bin/python -m pytest -q -n 2 tests
