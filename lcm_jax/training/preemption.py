"""SIGTERM (a preemption notice) as a stop request every process of a run agrees on.

With several processes, JAX's preemption sync manager (started by `jax.distributed.initialize`)
catches SIGTERM in whichever process receives it, tells the others through the coordination
service, and picks one step, the next after the furthest any process has reached, at which every
process's `reached(step)` turns true: all save that step and exit. A single process keeps a flag
set by a Python SIGTERM handler.
"""
from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class StopRequest:
    """`reached(step)` is True at the step where the run must save and exit. Call it once per
    step on every process, from the same first step; `close()` restores the SIGTERM handler."""

    def __init__(self):
        self._multi = jax.process_count() > 1
        self._flag = False
        self._previous = None
        if not self._multi:  # a Python handler would replace the sync manager's own
            self._previous = signal.signal(signal.SIGTERM, self._notice)

    def _notice(self, *_) -> None:
        self._flag = True

    def reached(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
