"""A pod in miniature: four `python -m lcm_jax.train` processes (gloo, one CPU device each) with
eval, the endpoint metric and checkpointing on and the workdir in a GCS bucket (the emulator).
SIGTERM to one process stops all four at the same saved step, kill -9 of all four loses only the
steps since the last checkpoint, and the reruns' metrics (and sample grids) equal an
uninterrupted four-process run's, step for step.

The fast case is the tiny LCD (synthetic latents). The slow case is the shapes LCD with its
sample grids and a teacher folder in the bucket (the tiny diffusers pipeline, so that it takes
minutes, not hours: four processes compile the VAE, text encoder and sampler each); with
LCM_JAX_TEST_SHAPES_TEACHER=1 it uses the shipped shapes teacher."""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import fsspec
import numpy as np
import pytest

from gcs_emulator import _free_port, gcs_bucket, gcs_server  # noqa: F401  (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 4
TOTAL = 20
TIMING = ("steps_per_s", "examples_per_s")


def _gfs():
    gfs = fsspec.filesystem("gs")
    gfs.invalidate_cache()
    return gfs


def _path(url: str) -> str:
    return url[len("gs://"):]


def _metrics(workdir: str) -> list[dict]:
    path = _path(workdir) + "/metrics.jsonl"
    if not _gfs().exists(path):
        return []
    return [json.loads(line) for line in _gfs().cat(path).decode().splitlines() if line.strip()]


def _launch(workdir: str, config: list[str]) -> list[subprocess.Popen]:
    args = [sys.executable, "-m", "lcm_jax.train", f"--workdir={workdir}", *config,
            f"--config.total_steps={TOTAL}", "--config.batch_size=8", "--config.log_every=1",
            "--config.eval_every=5", "--config.checkpoint_every=10", "--config.async_checkpointing=false",
            f"--coordinator=127.0.0.1:{_free_port()}", f"--num_processes={PROCESSES}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    for i in range(PROCESSES):  # files, not pipes: nobody reads them while it runs
        log = tempfile.TemporaryFile()
        procs.append(subprocess.Popen(args + [f"--process_id={i}"], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
        procs[-1].log = log  # Popen keeps no handle of a file it was given
    LAUNCHED.extend(procs)
    return procs


LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left():
    """A failed or timed-out test kills what it launched (gloo peers wait for each other forever)."""
    yield
    for p in LAUNCHED:
        if p.poll() is None:
            p.kill()
            p.wait()
    LAUNCHED.clear()


def _output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read().decode(errors="replace")


def _wait(procs, timeout=2400) -> list[str]:
    for p in procs:
        p.wait(timeout=timeout)
    outs = [_output(p) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    return outs


def _wait_for(condition, procs, what: str, timeout=2400) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert all(p.poll() is None for p in procs), f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def _samples(workdir: str) -> dict:
    gfs, root = _gfs(), _path(workdir) + "/samples"
    return {p.rsplit("/", 1)[1]: gfs.cat(p) for p in gfs.ls(root)} if gfs.exists(root) else {}


def _same_rows(got: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(got, ref):
        assert {k: v for k, v in a.items() if k not in TIMING} == \
               {k: v for k, v in b.items() if k not in TIMING}, (a, b)


TINY = ["--config=configs/tiny_lcd.py", "--config.eval_endpoint_timesteps=(999,499)"]
SHAPES = ["--config=lcm_jax/worlds/shapes/configs/shapes_lcd.py", "--config.sample_every=5",
          "--config.optim.warmup_steps=2", "--config.data.cache_size=0"]


@pytest.fixture
def config(request, gcs_bucket, tmp_path) -> list[str]:
    if request.param == "tiny":
        return TINY
    if os.environ.get("LCM_JAX_TEST_SHAPES_TEACHER"):
        return SHAPES  # the config's own: the shipped shapes teacher
    from tiny_pipeline import build_pipeline

    from lcm_jax import fs

    build_pipeline(str(tmp_path / "teacher"), time_cond_proj_dim=None)
    teacher = fs.publish_dir(str(tmp_path / "teacher"), f"{gcs_bucket}/models/teacher")
    return SHAPES + [f"--config.model.teacher={teacher}", "--config.data.text_len=16"]


# Slow: on two cores a launch takes minutes (processes 1-3 compile every launch, the persistent
# cache serves process 0 only, and gloo peers spin while process 0 writes to the bucket).
# The fast suite's two-process case: tests/test_train.py::test_sigterm_to_one_of_two_processes...
@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny", "shapes"], indirect=True)
def test_four_processes_agree_on_sigterm_and_resume_exactly(gcs_bucket, config):
    ref_dir, run_dir = f"{gcs_bucket}/ref", f"{gcs_bucket}/run"
    outs = _wait(_launch(ref_dir, config))
    assert f"{PROCESSES} devices, {PROCESSES} processes" in outs[0]
    ref = _metrics(ref_dir)
    assert [r["step"] for r in ref] == list(range(TOTAL + 1))  # step 0: the endpoint baseline
    sampled = "--config.sample_every=5" in config
    assert sorted(_samples(ref_dir)) == ([f"step_{s:06d}.png" for s in (5, 10, 15, 20)] if sampled else [])

    # SIGTERM to process 2 only, mid-run: every process saves the same step and exits.
    procs = _launch(run_dir, config)
    _wait_for(lambda: len(_metrics(run_dir)) >= 4, procs, "step 3")
    procs[2].send_signal(signal.SIGTERM)
    outs = _wait(procs)
    saved = [re.search(r"SIGTERM: saved step (\d+)", o) for o in outs]
    assert all(saved), "\n".join(o[-1500:] for o in outs)
    steps = {int(m.group(1)) for m in saved}
    assert len(steps) == 1 and 3 <= min(steps) < TOTAL, steps
    step = steps.pop()
    assert _gfs().exists(f"{_path(run_dir)}/checkpoints/{step}")

    # Resume; kill -9 every process once checkpoint 10 is committed (a pod losing all its hosts).
    procs = _launch(run_dir, config)
    _wait_for(lambda: _gfs().exists(f"{_path(run_dir)}/checkpoints/10/commit_success.txt"),
              procs, "checkpoint 10")
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    outs = _wait(_launch(run_dir, config))
    assert re.search(r"resumed from \S+ step (\d+)", outs[0]).group(1) in ("10", "20")
    _same_rows(_metrics(run_dir), ref)
    ref_samples, got = _samples(ref_dir), _samples(run_dir)
    assert sorted(got) == sorted(ref_samples)
    for name in ref_samples:  # the grids of the resumed run, pixel for pixel
        from io import BytesIO

        from PIL import Image

        a, b = (np.asarray(Image.open(BytesIO(x[name]))) for x in (ref_samples, got))
        np.testing.assert_array_equal(a, b)
