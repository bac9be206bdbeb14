# Two entry points: `make train` (the default run) and `make test`; both set up .venv on first use.
# One venv per machine, .venv, with the JAX of its hardware: `make setup` (CPU), `make setup JAX=cuda13` (or
# cuda12, tpu) on a GPU / TPU machine. The stamp names the flavour installed, so later `make train` / `make test`
# keep it and another JAX= reinstalls. Compile-only plugins for a CPU host (inspect_sharding.py --target) live in
# venvs of their own, so they never become the default backend of .venv: `make venv-cuda`, `make venv-tpu`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
JAX ?= $(or $(patsubst $(VENV)/.installed-jax-%,%,$(firstword $(wildcard $(VENV)/.installed-jax-*))),cpu)
STAMP := $(VENV)/.installed-jax-$(JAX)
PLUGINS := jax-cuda12-plugin jax-cuda12-pjrt jax-cuda13-plugin jax-cuda13-pjrt libtpu

.PHONY: setup train test test-fast bench clean venv-cuda venv-tpu
setup: $(STAMP)

# torch is pinned to the CPU wheel and installed before transformers so pip never pulls a CUDA build. The
# accelerator's jax plugin comes last, at the jax version the project installed.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	rm -f $(VENV)/.installed-jax-*
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -c constraints.txt -e ".[test]"
ifeq ($(JAX),cpu)
	$(VPY) -m pip uninstall -q -y $(PLUGINS) 2>/dev/null || true
else
	$(VPY) -m pip install -q -c constraints.txt "jax[$(JAX)]==$$($(VPY) -c 'import jax; print(jax.__version__)')"
endif
	touch $(STAMP)

# Compile-only targets: .venv-cuda (jax[cuda13], ~4 GB) and .venv-tpu (jax[tpu]), the setup.cfg extras.
venv-cuda: .venv-cuda/.installed
venv-tpu: .venv-tpu/.installed
.venv-%/.installed: setup.cfg pyproject.toml constraints.txt
	test -x .venv-$*/bin/python || $(PY) -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q --upgrade pip
	.venv-$*/bin/python -m pip install -q -c constraints.txt -e ".[$*]"
	touch $@

train: $(STAMP)
	$(VPY) scripts/train.py $(ARGS)

# One pytest-xdist worker per core; --dist loadfile keeps a file's tests (and its module fixtures: trained runs,
# compiled steps) in one worker; --no-loadscope-reorder hands files out longest first (tests/conftest.py,
# LONG_FILES) instead of by their number of tests. test-fast is the tier to run before each commit (BUILD.md, "Tests").
XDIST := -n auto --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(VPY) -m pytest -q $(XDIST) tests $(ARGS)

test-fast: $(STAMP)
	$(VPY) -m pytest -q $(XDIST) -m "not slow" tests $(ARGS)

bench: $(STAMP)
	$(VPY) scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) .venv-cuda .venv-tpu build *.egg-info .pytest_cache
