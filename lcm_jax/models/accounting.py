"""FLOP accounting: a tracing mode in which every FLOP of a program shows in XLA's cost analysis.

XLA's cost analysis counts a loop's body once whatever its trip count (a sampler's `lax.scan`,
gradient accumulation, blocked attention) and a Pallas kernel (splash attention) as next to
nothing. Under `counting()` attention uses the XLA formulation and those loops are unrolled, so
`jax.jit(f).lower(...).cost_analysis()` of the same function counts them all. The program
compiled for running is traced outside this mode; `planning` lowers once more inside it.
"""
import contextlib
import threading

_STATE = threading.local()


def on() -> bool:
    """True while tracing for FLOP accounting."""
    return getattr(_STATE, "on", False)


@contextlib.contextmanager
def counting():
    before, _STATE.on = on(), True
    try:
        yield
    finally:
        _STATE.on = before
