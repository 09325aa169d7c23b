# Set-up and entry points. Every target creates the virtual environment on first use,
# so a fresh machine with only Python needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast lint bench clean

# The install says what it is doing, step by step, with the time taken; pip itself runs with -qq
# (errors only), so the mirrors' "Location ... is ignored" warnings do not bury it.
SAY    := @printf '[install] %s\n'
$(STAMP): pyproject.toml constraints.txt
	@start=$$(date +%s); \
	printf '[install] 1/3 virtual environment %s\n' $(VENV); \
	{ test -x $(PY) || $(PYTHON) -m venv $(VENV); } && $(PY) -m pip install -qq --upgrade pip && \
	printf '[install] 2/3 %s, the CPU wheel (first, pinned, so that nothing below can pull another build)\n' $(TORCH) && \
	$(PY) -m pip install -qq $(TORCH) && \
	printf '[install] 3/3 mythos and its dependencies (Ray, MLflow, lm-eval, ...; the longest step)\n' && \
	$(PY) -m pip install -qq -c constraints.txt -e ".[dev]" && \
	printf '[install] done in %s s\n' $$(( $$(date +%s) - start ))
	@touch $(STAMP)

install: $(STAMP)

# Headless Chromium (Debian's package) for the test that opens the MLflow UI page of a run.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	$(SAY) "headless Chromium for the MLflow UI test (Debian package chromium, about 1-2 min)"
	@apt-get install -y -qq --no-install-recommends chromium >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# Two pytest workers, whole modules each, in the order tests/conftest.py sets (SLOW_FIRST: xdist
# would otherwise reorder them by test count): much of the suite waits on Ray, servers and
# subprocesses, so two share the 2 cores well.
test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

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
