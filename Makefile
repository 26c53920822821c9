# The two commands: `make run` and `make test`. Each sets up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench install proto clean-venv gpu-wheels gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml or the compiled modules (setup.py, their C sources) change.
$(STAMP): pyproject.toml setup.py services/tandem/common/_block_chain.c services/tandem/common/_crc32c.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# A whole local cluster (Redis, 1 prefill + 1 decode worker, gateway on :8000); Ctrl-C stops it.
# Extra flags: make run ARGS="--prefill 2 --decode 2 --port 8080".
run: $(STAMP)
	$(BIN)/tandem up $(ARGS)

# Lint, format check and type check first (configured in pyproject.toml), then every test.
test: $(STAMP)
	$(BIN)/ruff check services kernels loadtest tests
	$(BIN)/ruff format --check services kernels loadtest tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The benchmark set (about 15 minutes on 2 cores): every ratio the project claims, measured in
# one run, written to BENCHMARKS.md next to its goal. Extra flags: make bench ARGS="--only kv".
bench: $(STAMP)
	$(BIN)/python -m tandem.loadtest bench --out BENCHMARKS.md $(ARGS)

# Regenerate the gRPC stubs from proto/ (tests/unit/test_proto_fresh.py checks they are fresh).
proto: $(STAMP)
	$(BIN)/python -m tandem.common.protogen

# The GPU check (README: "GPU check"). `gpu-wheels` downloads, here, the runtime packages the GPU
# image lacks into deploy/gpu/wheelhouse/ (git-ignored; carry it to the GPU machine);
# `gpu-check` runs there with no network and no .venv: it installs those wheels and the project
# into the image's python3, then runs every step and writes the summary into $OUT.
gpu-wheels: $(STAMP)
	$(BIN)/python -m tandem.loadtest.gpu wheels --dest deploy/gpu/wheelhouse

gpu-check:
	bash deploy/gpu/check.sh $(ARGS)

clean-venv:
	rm -rf $(VENV)
