"""The trainer end to end: sharding equivalence, resume after kill -9, SIGTERM, NaN stop. Runs the
real `python -m lcm_jax.train` on configs/tiny_lcd.py; two processes are in test_train_processes.py."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "lcm_jax.train", "--config=configs/tiny_lcd.py"]


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _run(args, devices=1, timeout=900):
    out = subprocess.run(TRAIN + args, cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """50 uninterrupted steps through the CLI, checkpointing every 10."""
    workdir = str(tmp_path_factory.mktemp("full"))
    out = _run([f"--workdir={workdir}", "--config.checkpoint_every=10"])
    return workdir, out.stdout


def test_sharded_step_matches_single_device():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_step.py"), "lcd"],
                         cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(r["loss_1"] - r["loss_8"]) <= 1e-5 * max(1.0, abs(r["loss_1"]))
    assert r["max_param_diff"] <= 1e-5 * max(1.0, r["param_scale"]), r["max_param_diff"]
    specs = r["specs"]
    # Kernels of >= 4096 elements are split over 'fsdp' along a divisible axis; small ones replicate.
    assert "fsdp" in specs["down_blocks_1/resnets_0/conv2/kernel"]
    assert specs["conv_in/bias"] in ("P()", "PartitionSpec()")


def test_fifty_steps_loss_falls(full_run):
    workdir, stdout = full_run
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == list(range(5, 51, 5))
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 5 and all(np.isfinite(evals))
    assert evals[-1] < 0.9 * evals[0], evals
    assert "steps/s" in stdout and "ETA" in stdout
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["method"] == "lcd"
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))


def test_endpoint_error_is_logged_from_step_zero(tmp_path):
    workdir = str(tmp_path / "endpoint")
    out = _run([f"--workdir={workdir}", "--config.total_steps=10", "--config.eval_every=5",
                "--config.eval_endpoint_timesteps=(999, 499)"])
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == [0, 5, 10]
    keys = ("endpoint_mse/t999", "endpoint_mse/t499")
    for r in rows:
        assert all(np.isfinite(r[k]) and r[k] > 0 for k in keys), r
    # From t = 999 one step is much further from the chain's end than from t = 499.
    assert rows[0][keys[0]] > rows[0][keys[1]], rows[0]
    assert "before distillation: eval_loss" in out.stdout and "endpoint_mse t999" in out.stdout
    bad = subprocess.run(TRAIN + [f"--workdir={tmp_path / 'bad'}", "--config.eval_every=5",
                                  "--config.eval_endpoint_timesteps=(998,)"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "[998]" in bad.stderr and "skipping grid" in bad.stderr


def test_resume_after_kill_matches_uninterrupted(full_run, tmp_path):
    ref = {r["step"]: r for r in _metrics(full_run[0])}
    workdir = str(tmp_path / "killed")
    args = [f"--workdir={workdir}", "--config.checkpoint_every=10"]
    proc = subprocess.Popen(TRAIN + args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "20")):
        assert proc.poll() is None and time.time() < deadline, "run ended before step 20"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in _metrics(workdir))
    assert killed_at < 50
    out = _run(args)
    assert "resumed from" in out.stdout
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == sorted(ref)
    for r in rows:
        np.testing.assert_allclose(r["loss"], ref[r["step"]]["loss"], rtol=1e-6)


def test_restore_run_reads_the_chosen_checkpoint(full_run):
    """training.checkpoints.restore: the latest by default, any kept step on request, a missing one
    refused with the steps that exist (the shapes world's eval_checkpoints walks a run this way)."""
    from lcm_jax.training.checkpoints import RunError, restore

    workdir = full_run[0]
    latest, s40 = restore(workdir).state, restore(workdir, step=40).state
    assert int(latest.step) == 50 and int(s40.step) == 40
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(latest.params), jax.tree.leaves(s40.params))]
    assert max(diffs) > 0  # ten optimizer steps apart
    with pytest.raises(RunError, match=r"no step 7; it holds \[30, 40, 50\]"):
        restore(workdir, step=7)


def test_sigterm_saves_and_exits(tmp_path):
    workdir = str(tmp_path / "term")
    proc = subprocess.Popen(TRAIN + [f"--workdir={workdir}", "--config.total_steps=100000",
                                     "--config.checkpoint_every=100000"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 900
    while not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved step" in out
    step = int(re.search(r"SIGTERM: saved step (\d+)", out).group(1))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny_lcd

    from lcm_jax import train
    from lcm_jax.data import sources

    batch = sources.SyntheticLatents.batch

    def poisoned(self, step, *a):
        out = batch(self, step, *a)
        if step == 12:
            out["latents"] = out["latents"] * np.nan
        return out

    monkeypatch.setattr(sources.SyntheticLatents, "batch", poisoned)
    config = tiny_lcd.get_config()
    config.checkpoint_every = 10
    config.eval_every = 0
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.TrainingError, match="non-finite loss or gradient at step 13"):
        train.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]


def test_diffusion_training_keeps_an_exact_weight_ema():
    """method='diffusion' with diffusion_ema_decay: target_params is the EMA of the weights after
    every step (what a teacher ships), and the weights themselves train exactly as without it."""
    import jax
    from configs.tiny_lcd import get_config
    from lcm_jax import sharding, train

    def run(decay, steps=3):
        config = get_config("diffusion")
        config.diffusion_ema_decay = decay
        s = train.setup(config, sharding.make_mesh(1, 1))
        state, history = s.state, [jax.device_get(s.state.params)]
        for i in range(steps):
            state, _ = s.step_fn(state, s.frozen, s.source.batch(i))
            history.append(jax.device_get(state.params))
        return jax.device_get(state), history

    state, history = run(0.75)
    expect = history[0]
    for p in history[1:]:
        expect = jax.tree.map(lambda e, x: 0.75 * e + 0.25 * x, expect, p)
    for a, b in zip(jax.tree.leaves(state.target_params), jax.tree.leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    plain, plain_history = run(0.0)
    assert plain.target_params is None
    for a, b in zip(jax.tree.leaves(history[-1]), jax.tree.leaves(plain_history[-1])):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(state.target_params),
                                                        jax.tree.leaves(history[-1])))


def test_new_w_embedding_leaves_zeros_or_torch_linear_default():
    """The student's cond_proj, absent from the teacher: zeros, or U(+-1/sqrt(fan_in)) as a
    torch.nn.Linear that diffusers' LCD script leaves at its default; a bad name is refused."""
    from lcm_jax.training import models

    teacher = {"time_embedding": {"linear_1": {"kernel": np.ones((8, 16), np.float32)}}}
    shapes = {"time_embedding": {"linear_1": {"kernel": jax.ShapeDtypeStruct((8, 16), np.float32)},
                                 "cond_proj": {"kernel": jax.ShapeDtypeStruct((64, 8), np.float32)}}}
    zeros = models._with_new_leaves(teacher, shapes, "zeros")
    assert not np.any(zeros["time_embedding"]["cond_proj"]["kernel"])
    np.testing.assert_array_equal(zeros["time_embedding"]["linear_1"]["kernel"], 1.0)
    k = models._with_new_leaves(teacher, shapes, "uniform", seed=3)["time_embedding"]["cond_proj"]["kernel"]
    assert k.shape == (64, 8) and k.dtype == np.float32
    assert np.abs(k).max() <= 1 / 8 and np.abs(k).max() > 0.9 / 8  # bound 1/sqrt(64)
    assert abs(float(np.std(k)) - (1 / 8) / np.sqrt(3)) < 0.01      # uniform's std
    with pytest.raises(ValueError, match="w_embedding_init must be one of .* got 'normal'"):
        models._with_new_leaves(teacher, shapes, "normal")


def test_lcd_without_ema_uses_the_current_student_as_target():
    """loss.ema_decay = 0 keeps no EMA: the consistency target is the student itself (stop-
    gradient), so the first step (where the EMA still equals the student) matches decay 0.95
    exactly, and later steps differ."""
    import jax
    from configs.tiny_lcd import get_config
    from lcm_jax import sharding, train

    def losses(decay, steps=2):
        config = get_config()
        config.loss.ema_decay = decay
        s = train.setup(config, sharding.make_mesh(1, 1))
        state, out = s.state, []
        for i in range(steps):
            state, m = s.step_fn(state, s.frozen, s.source.batch(i))
            out.append(float(m["loss"]))
        return state, out

    state0, no_ema = losses(0.0)
    assert state0.target_params is None and np.all(np.isfinite(no_ema))
    _, ema = losses(0.95)
    assert no_ema[0] == pytest.approx(ema[0], rel=1e-6)
    assert no_ema[1] != pytest.approx(ema[1], rel=1e-6)


def test_metrics_writer_keeps_rows_up_to_the_restored_step_only(tmp_path):
    """A resume from step 5 keeps rows 0..5; a fresh start (a kill before the first checkpoint)
    keeps none, since it logs the step-0 baseline again; a row cut short by a kill is dropped."""
    from lcm_jax.training.metrics import MetricsWriter

    rows = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in (0, 5, 10)]
    path = tmp_path / "metrics.jsonl"
    for start, kept in ((5, [0, 5]), (0, [])):
        path.write_text("\n".join(rows) + '\n{"step": 11, "lo')
        MetricsWriter(str(tmp_path), start).close()
        assert [r["step"] for r in _metrics(str(tmp_path))] == kept
