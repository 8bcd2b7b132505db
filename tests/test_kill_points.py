"""kill -9 anywhere loses nothing: a shapes LCD run killed five times (inside the latent cache
build, inside a checkpoint write, and at three seeded random moments of the loop), each time
rerun with the same command, ends with a metrics.jsonl equal to an uninterrupted run's, bitwise."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "lcm_jax", "worlds", "shapes", "configs", "shapes_lcd.py")
STEPS = 16
ARGS = [f"--config.total_steps={STEPS}", "--config.batch_size=8", "--config.log_every=1",
        "--config.eval_every=8", "--config.checkpoint_every=4", "--config.sample_every=0",
        "--config.keep_checkpoints=2", "--config.data.num_examples=4096",
        "--config.data.cache_size=512"]   # two cache shards of 256
TIMED = ("steps_per_s", "examples_per_s")  # wall-clock figures: the only fields allowed to differ
RANDOM_KILLS = 3
SEED = 20261201

# Seven launches of the shapes trainer: about 5 minutes on 2 quiet cores. `make test-slow`.
pytestmark = pytest.mark.slow


def _command(workdir: str) -> list[str]:
    return [sys.executable, "-m", "lcm_jax.train", f"--config={CONFIG}", f"--workdir={workdir}", *ARGS]


def _env(cache_dir: str) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "LCM_JAX_LATENT_CACHE_DIR": cache_dir,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]  # a row cut by the kill is not read


def _last_step(workdir: str) -> int:
    return max((r["step"] for r in _rows(workdir)), default=-1)


def _cache_partly_written(cache_dir: str) -> bool:
    shards = [f for _, _, files in os.walk(cache_dir) for f in files if f.startswith("shard-")]
    return len(shards) == 1  # of two


def _checkpoint_being_written(workdir: str) -> bool:
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any("tmp" in name for name in os.listdir(folder))


def _kill_when(cmd, env, condition, what: str, timeout: float = 900) -> None:
    """Starts the run, kills it with SIGKILL the moment `condition()` holds."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while not condition():
            assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def _finish(cmd, env) -> None:
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("whole"))
    _finish(_command(workdir), _env(str(tmp_path_factory.mktemp("whole_cache"))))
    return _rows(workdir)


def test_five_kills_leave_metrics_equal_to_an_uninterrupted_run(uninterrupted, tmp_path):
    workdir, cache_dir = str(tmp_path / "killed"), str(tmp_path / "cache")
    cmd, env = _command(workdir), _env(cache_dir)
    _kill_when(cmd, env, lambda: _cache_partly_written(cache_dir), "latent cache shard")
    _kill_when(cmd, env, lambda: _checkpoint_being_written(workdir), "checkpoint write")
    rng = np.random.default_rng(SEED)
    for _ in range(RANDOM_KILLS):  # a step after the resume point, then a random moment past it
        target = int(rng.integers(_last_step(workdir) + 1, STEPS - 1))
        pause = float(rng.uniform(0.0, 0.5))
        reached = {}

        def past_target() -> bool:
            if _last_step(workdir) < target:
                return False
            reached.setdefault("at", time.time())
            return time.time() - reached["at"] >= pause

        _kill_when(cmd, env, past_target, f"step {target}")
    assert _last_step(workdir) < STEPS
    _finish(cmd, env)

    got = _rows(workdir)
    assert [r["step"] for r in got] == [r["step"] for r in uninterrupted]
    for mine, ref in zip(got, uninterrupted):
        strip = lambda r: {k: v for k, v in r.items() if k not in TIMED}
        assert strip(mine) == strip(ref), (mine["step"], strip(mine), strip(ref))  # bitwise: == on floats
    assert any("eval_loss" in r for r in got) and any("endpoint_mse/t999" in r for r in got)
