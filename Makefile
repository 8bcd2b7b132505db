PYTHON ?= python
PIP ?= $(PYTHON) -m pip
TORCH_INDEX ?=

.PHONY: install install-test demo test test-slow bench

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q -e ".[test]"

# The main job on the bundled default: distill an LCM from the shipped shapes teacher on CPU.
demo: install
	$(PYTHON) -m lcm_jax.demo --workdir=runs/demo

# The whole fast suite (full-size parity tests are marked `slow`; run them with `make test-slow`).
# Test files are spread over TEST_WORKERS processes (a module's fixtures stay in one), which share
# one persistent XLA cache; TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: install-test
	$(PYTHON) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

test-slow: install-test
	$(PYTHON) -m pytest -q -m slow tests

bench: install-test
	$(PYTHON) tools/bench_unet.py
