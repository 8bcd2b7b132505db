"""Test-session setup: the tests' own module path and one shared persistent XLA cache.

Training tests start several processes that compile the same tiny train step; a session-wide
compilation cache (inherited by subprocesses through LCM_JAX_CACHE_DIR) compiles it once.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (test extra) would otherwise probe for a TPU
os.environ.setdefault("LCM_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="lcm_jax_xla_"))
# The latent caches training tests make (data.cache_size > 0) go to this session's own folder.
os.environ.setdefault("LCM_JAX_LATENT_CACHE_DIR", tempfile.mkdtemp(prefix="lcm_jax_latents_"))


# Files that start trainers or compile for TPU go first, so that the xdist workers of `make test`
# (one file at a time each) do not end with one long file running alone.
HEAVY_FIRST = ("test_train_processes.py", "test_train.py", "test_plan.py", "test_export.py", "test_gcs.py",
               "test_methods.py", "test_evaluate.py", "test_bad_inputs.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in HEAVY_FIRST)  # stable: the rest keep their order
