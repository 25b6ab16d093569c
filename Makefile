# Two entry points, each self-contained on a fresh machine (Python 3.11, nothing installed):
#   make bench   - create .venv, install fewbit, run `fewbit bench` (the main job)
#   make test    - create .venv, install fewbit + test tools, run ruff and the whole test suite
# torch is pinned on the same pip command line so no package pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: bench test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	touch $@

bench: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/fewbit bench

test: $(VENV)/.installed
	$(VENV)/bin/ruff check fewbit tests benchmarks
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check fewbit tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
