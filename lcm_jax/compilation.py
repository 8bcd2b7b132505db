"""XLA compilation: the persistent cache (so a new process reuses compiled programs) and a meter of
compile time and cache hits."""
from __future__ import annotations

import os
from typing import Optional

import jax

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "lcm_jax", "xla")


def enable_compilation_cache(path: Optional[str] = None) -> str:
    """Turns on jax's persistent compilation cache at `path` (default: $LCM_JAX_CACHE_DIR, else
    ~/.cache/lcm_jax/xla) for this process. Entry points call it once; the library never does."""
    path = path or os.environ.get("LCM_JAX_CACHE_DIR", DEFAULT_CACHE_DIR)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompileMeter:
    """XLA compile seconds and persistent-cache hits since `reset()` (jax.monitoring events).

    jax.monitoring has no way to remove a listener, so a meter listens for the life of the process;
    make one per process (the CLI and the benchmarks each hold one).
    """

    def __init__(self):
        self.reset()
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def reset(self) -> None:
        self.seconds, self.cache_hits, self.durations = 0.0, 0, {}

    def _on_duration(self, event: str, seconds: float, **_) -> None:
        self.durations[event] = self.durations.get(event, 0.0) + seconds
        if event == "/jax/core/compile/backend_compile_duration":
            self.seconds += seconds

    def _on_event(self, event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1
