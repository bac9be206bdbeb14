# Two entry points: `make train` (the default run) and `make test`; both set up .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-fast bench clean
setup: $(STAMP)

# torch is pinned to the CPU wheel and installed before transformers so pip never pulls a CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(VPY) scripts/train.py $(ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q tests $(ARGS)

test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow" tests $(ARGS)

bench: $(STAMP)
	$(VPY) scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
