# Set-up and entry points. Every target creates the virtual environment on first use,
# so a fresh machine with only Python needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing below can resolve to another build
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not slow" $(PYTEST_ARGS)

# One-way package layers (pyproject.toml [tool.importlinter]); tests/test_layers.py runs it too.
lint: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

bench: $(STAMP)
	$(PY) benchmarks/model_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

.PHONY: demo pretrain
# The main command: the whole life cycle on the embedded defaults (local Ray, SQLite MLflow,
# generated corpus): pretrain -> sweep -> evaluate -> serve the winner -> one request.
demo: $(STAMP)
	$(PY) jobs/pipeline.py --config jobs/configs/pipeline-debug.yaml $(ARGS)

# Pretraining alone: the debug model on the generated multi-hop corpus.
pretrain: $(STAMP)
	$(PY) jobs/pretrain.py --config jobs/configs/debug.yaml $(ARGS)
