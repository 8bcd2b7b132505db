PYTHON ?= python
PIP ?= $(PYTHON) -m pip
TORCH_INDEX ?=

.PHONY: install install-test libtpu demo test test-slow bench

install:
	$(PIP) install -q -e .

install-test: libtpu
	$(PIP) install -q -e ".[test]"

# libtpu, the TPU compiler `lcm-jax plan` compiles with (no TPU needed), in a folder of its own
# rather than site-packages: on a machine without TPUs every JAX process that finds libtpu prints
# its start-up errors. The version is the one the installed jax asks for (jax[tpu]).
LCM_JAX_LIBTPU_DIR ?= $(HOME)/.cache/lcm_jax/libtpu
export LCM_JAX_LIBTPU_DIR
libtpu: install
	test -f $(LCM_JAX_LIBTPU_DIR)/libtpu/libtpu.so || $(PIP) install -q --no-deps --target $(LCM_JAX_LIBTPU_DIR) \
	  "$$($(PYTHON) -c "import importlib.metadata as m; print(next(r.split(';')[0] for r in m.requires('jax') if r.startswith('libtpu')))")"

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
