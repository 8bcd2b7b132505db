"""Two trainer processes over jax.distributed (gloo, one CPU device each) against one process with
two devices: equal metrics, SIGTERM to one process stopping both at one step, and a NaN on one
process stopping both. A file of its own so that the test workers share the trainer tests."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
from test_train import ROOT, TRAIN, _env, _metrics, _run


def _two_processes(cmd: list[str]) -> list[subprocess.Popen]:
    """`cmd` as processes 0 and 1 of one jax.distributed run, one CPU device each."""
    port = 20000 + (os.getpid() + int(time.time())) % 20000
    dist = [f"--coordinator=localhost:{port}", "--num_processes=2"]
    return [subprocess.Popen(cmd + dist + [f"--process_id={i}"], cwd=ROOT, env=_env(1), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]


def test_two_processes_match_one_process_two_devices(tmp_path):
    one = str(tmp_path / "one")
    common = ["--config.total_steps=5", "--config.log_every=1", "--config.eval_every=0",
              "--config.checkpoint_every=5"]
    _run([f"--workdir={one}"] + common, devices=2)
    two = str(tmp_path / "two")
    procs = _two_processes(TRAIN + [f"--workdir={two}"] + common)
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "2 devices, 2 processes" in outs[0]
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a], rtol=1e-4)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    """SIGTERM reaches process 1 only; JAX's preemption sync manager makes both save the same
    step and exit, and the rerun's metrics equal an uninterrupted run's (one process, two
    devices: the same mesh) step for step. tests/test_multihost.py does it with four processes,
    a bucket and the shapes LCD (slow)."""
    total = 300
    common = [f"--config.total_steps={total}", "--config.log_every=1", "--config.eval_every=0",
              "--config.checkpoint_every=100"]
    ref = str(tmp_path / "ref")
    _run([f"--workdir={ref}"] + common, devices=2)
    run = str(tmp_path / "run")

    def launch():
        return _two_processes(TRAIN + [f"--workdir={run}"] + common)

    procs = launch()
    deadline = time.time() + 900
    while not (os.path.exists(os.path.join(run, "metrics.jsonl")) and len(_metrics(run)) >= 3):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "ended before step 3"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    steps = {int(re.search(r"SIGTERM: saved step (\d+)", o).group(1)) for o in outs}
    assert len(steps) == 1 and 3 <= min(steps) < total, steps
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [str(s) for s in sorted(
        {s for s in (100, 200) if s < min(steps)} | steps)]
    outs = [p.communicate(timeout=900)[0] for p in launch()]
    assert f"resumed from {run}/checkpoints step {min(steps)}" in outs[0]
    a, b = _metrics(ref), _metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, total + 1))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)


# Process 1's share of step 12's batch is NaN; nothing else differs between the processes.
POISON_ONE_PROCESS = r"""
import runpy, sys
import numpy as np
from lcm_jax.data import sources

batch = sources.SyntheticLatents.batch

def poisoned(self, step, process_index=0, process_count=1):
    out = batch(self, step, process_index, process_count)
    if step == 12 and process_index == 1:
        out["latents"] = out["latents"] * np.nan
    return out

sources.SyntheticLatents.batch = poisoned
sys.argv = ["lcm_jax.train"] + sys.argv[1:]
runpy.run_module("lcm_jax.train", run_name="__main__")
"""


def test_non_finite_loss_on_one_of_two_processes_stops_both_at_one_step(tmp_path):
    workdir = str(tmp_path / "nan")
    procs = _two_processes([sys.executable, "-c", POISON_ONE_PROCESS, "--config=configs/tiny_lcd.py",
                            f"--workdir={workdir}", "--config.total_steps=30", "--config.checkpoint_every=10",
                            "--config.eval_every=0"])
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 2, out[-3000:]
        assert "non-finite loss or gradient at step 13" in out, out[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]
