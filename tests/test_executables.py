"""Compiled programs on disk (lcm_jax.executables): a new process, or a new pipeline object, loads
the stored executable instead of tracing and compiling, gets the same numbers, and recovers from a
damaged file."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny_pipeline import build_pipeline

from lcm_jax.executables import ExecutableCache, signature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _TraceCounter:
    """Counts jax traces (each trace emits a jaxpr_trace_duration event)."""

    count = 0
    _registered = False

    @classmethod
    def reset(cls):
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._on)
            cls._registered = True
        cls.count = 0

    @classmethod
    def _on(cls, event, seconds, **_):
        if event.endswith("jaxpr_trace_duration"):
            cls.count += 1


def _fn():
    return jax.jit(lambda p, x: {"y": jnp.tanh(x @ p["w"]) + p["b"]})


def _args(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return ({"w": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32), "b": jnp.ones((8,))},
            jnp.asarray(rng.standard_normal((n, 8)), jnp.float32))


def test_second_cache_loads_from_disk_without_tracing(tmp_path):
    args = _args()
    expect = _fn()(*args)["y"]
    first = ExecutableCache(str(tmp_path))
    np.testing.assert_array_equal(first(_fn(), "f", *args)["y"], expect)
    assert len(os.listdir(tmp_path)) == 1
    _TraceCounter.reset()
    second = ExecutableCache(str(tmp_path))
    out = second(_fn(), "f", *_args(seed=1))  # same signature, other values
    assert _TraceCounter.count == 0
    np.testing.assert_allclose(out["y"], _fn()(*_args(seed=1))["y"], rtol=1e-6)


def test_key_separates_shapes_and_fingerprints(tmp_path):
    cache = ExecutableCache(str(tmp_path))
    cache(_fn(), "f", *_args(n=4))
    cache(_fn(), "f", *_args(n=5))      # another batch size
    cache(_fn(), "g", *_args(n=4))      # another program
    assert len(os.listdir(tmp_path)) == 3
    assert signature(_args(n=4)) != signature(_args(n=5))


def test_damaged_file_is_recompiled_with_a_warning(tmp_path):
    args = _args()
    ExecutableCache(str(tmp_path))(_fn(), "f", *args)
    (path,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="could not be loaded"):
        out = ExecutableCache(str(tmp_path))(_fn(), "f", *args)
    np.testing.assert_array_equal(out["y"], _fn()(*args)["y"])
    assert os.path.getsize(path) > 100  # replaced by a good one


def test_new_process_samples_from_the_stored_pipeline_program(tmp_path):
    folder, cache = str(tmp_path / "pipe"), str(tmp_path / "cache")
    build_pipeline(folder)
    script = (
        "import json, sys, jax, numpy as np\n"
        "sys.path.insert(0, %r)\n"
        "from lcm_jax.models.unet import UNet2DConditionModel\n"
        "from lcm_jax.compilation import enable_compilation_cache\n"
        "from lcm_jax.pipeline import LCMPipeline\n"
        "calls, call = [], UNet2DConditionModel.__call__\n"
        "UNet2DConditionModel.__call__ = lambda *a, **k: calls.append(1) or call(*a, **k)\n"
        "cache = enable_compilation_cache(%r)\n"
        "pipe = LCMPipeline.from_pretrained(%r, executables_dir=cache + '/executables')\n"
        "calls.clear()  # loading traces the UNet once for its shapes (jax.eval_shape)\n"
        "img = pipe(['a red circle', 'a blue star'], num_inference_steps=2, height=64, width=64, seed=3)\n"
        "np.save(sys.argv[1], img)\n"
        "e = pipe._executables\n"
        "print(json.dumps({'unet_traces': len(calls), 'loaded': e.loaded, 'compiled': e.compiled}))\n"
    ) % (os.path.join(ROOT, "tests"), cache, folder)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = []
    for i in range(2):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"img{i}.npy")], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(eval(out.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"unet_traces": 1, "loaded": 0, "compiled": 2}, runs  # text encoder, sampler
    assert runs[1] == {"unet_traces": 0, "loaded": 2, "compiled": 0}, runs
    np.testing.assert_array_equal(np.load(tmp_path / "img0.npy"), np.load(tmp_path / "img1.npy"))
