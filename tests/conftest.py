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
