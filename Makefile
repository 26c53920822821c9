# The two commands: `make run` and `make test`. Each sets up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install proto clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tandem generate --max-tokens 32 "Hello from Tandem"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Regenerate the gRPC stubs from proto/ (tests/unit/test_proto_fresh.py checks they are fresh).
proto: $(STAMP)
	$(BIN)/python -m services.common.protogen

clean-venv:
	rm -rf $(VENV)
