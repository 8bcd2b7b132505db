"""Compiled programs kept on disk, so that a new process skips tracing, lowering and compiling.

jax's persistent compilation cache skips only the XLA compile: every new process still traces the
Python function and lowers it to StableHLO to compute the cache key, and for a sampler holding a
Stable Diffusion UNet, VAE decoder and text encoder that alone takes seconds. `ExecutableCache`
serializes the compiled executable itself (`jax.experimental.serialize_executable`) under a key
made of everything the program depends on besides its arguments' values:

- the caller's fingerprint (for the pipeline: the modules and their configs, the noise schedule,
  the sampler, its timesteps and switches, the attention implementation),
- the arguments' tree structure, shapes, dtypes and shardings,
- the lcm_jax source code, the jax and jaxlib versions, the backend and its devices, XLA_FLAGS.

A file that cannot be read or loaded (truncated, another jaxlib) is recompiled and replaced; files
are written atomically. Executables are also kept in memory for the life of the object.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jaxlib


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 of every .py file of the lcm_jax package (any code change invalidates the cache)."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _leaf_signature(x: Any) -> tuple:
    sharding = getattr(x, "sharding", None)
    return (tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
            bool(getattr(x, "weak_type", False)), repr(sharding) if sharding is not None else None)


def signature(args: tuple) -> str:
    """The arguments' tree structure, shapes, dtypes, weak types and shardings, as a string."""
    leaves, tree = jax.tree.flatten(args)
    return repr((str(tree), [_leaf_signature(x) for x in leaves]))


def _environment() -> str:
    devices = jax.devices()
    return repr((jax.__version__, jaxlib.__version__, jax.default_backend(), len(devices),
                 devices[0].device_kind, jax.process_count(), os.environ.get("XLA_FLAGS", ""),
                 jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision),
                 source_digest()))


class ExecutableCache:
    """`cache(fn, fingerprint, *args)` == `fn(*args)` for a jitted `fn`, through an executable
    compiled once per (fingerprint, argument signature) and stored under `directory` (None: kept
    in memory only)."""

    def __init__(self, directory: Optional[str]):
        self.directory = directory
        self._memory: dict[str, Callable] = {}
        self._warned = False
        self.loaded = self.compiled = 0  # executables read from disk / compiled, by this object
        self.load_seconds = 0.0          # time spent reading stored executables

    def __call__(self, fn, fingerprint: str, *args):
        key = hashlib.sha256(repr((fingerprint, signature(args), _environment())).encode()).hexdigest()
        exe = self._memory.get(key)
        if exe is None:
            exe = self._load(key) or self._compile_and_store(key, fn, args)
            self._memory[key] = exe
        return exe(*args)

    def path(self, key: str) -> Optional[str]:
        return None if self.directory is None else os.path.join(self.directory, f"{key}.jaxexe")

    def _load(self, key: str) -> Optional[Callable]:
        from jax.experimental import serialize_executable

        path = self.path(key)
        if path is None or not os.path.exists(path):
            return None
        t0 = time.perf_counter()
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            exe = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # corrupt, truncated or from another runtime: compile again
            warnings.warn(f"compiled program {path} could not be loaded ({type(e).__name__}: {e}); "
                          "compiling it again")
            return None
        self.loaded += 1
        self.load_seconds += time.perf_counter() - t0
        return exe

    def _compile_and_store(self, key: str, fn, args: tuple) -> Callable:
        from jax.experimental import serialize_executable

        compiled = fn.lower(*args).compile()
        self.compiled += 1
        path = self.path(key)
        if path is not None:
            tmp = f"{path}.tmp-{os.getpid()}"
            try:
                os.makedirs(self.directory, exist_ok=True)
                with open(tmp, "wb") as f:
                    pickle.dump(serialize_executable.serialize(compiled), f)
                os.replace(tmp, path)
            except Exception as e:  # a backend that cannot serialize: keep it in memory only
                if os.path.exists(tmp):
                    os.remove(tmp)
                if not self._warned:
                    warnings.warn(f"compiled programs are not stored in {self.directory} "
                                  f"({type(e).__name__}: {e}); each new process compiles again")
                    self._warned = True
        return compiled
