"""The launchers' --dry-run: the exact commands for a slice or a node count, nothing run."""
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--config", "configs/sd15_lcd.py:gs://b/sd15", "--workdir", "gs://b/runs/x",
       "--set", "mesh.fsdp=4", "--set", "data.path=gs://b/shards/{00000..00009}.tar", "--dry-run"]
TRAIN_ARGS = ("--config=configs/sd15_lcd.py:gs://b/sd15 --workdir=gs://b/runs/x --config.mesh.fsdp=4 "
              "'--config.data.path=gs://b/shards/{00000..00009}.tar'")


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("accelerator, gcloud_name, chips, workers", [
    ("v5e-16", "v5litepod-16", 16, 4), ("v5p-8", "v5p-8", 4, 1), ("v4-32", "v4-32", 16, 4),
    ("v6e-8", "v6e-8", 8, 1)])
def test_tpu_pod_dry_run(accelerator, gcloud_name, chips, workers):
    out = _launch("tpu_pod_lcd.py", "--tpu", "t1", "--zone", "us-west4-a", "--accelerator", accelerator, *RUN)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"# slice t1: {gcloud_name}, {chips} chips, {workers} workers; "
                               "coordinator: worker 0 port 8476")
    create, archive, upload, ssh = (shlex.split(line) for line in lines[1:])
    assert create[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1", "--zone=us-west4-a"]
    assert f"--accelerator-type={gcloud_name}" in create
    assert archive[:2] == ["git", "archive"] and upload[-1] == "gs://b/runs/x/code/lcm-jax.tar.gz"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"] and "--worker=all" in ssh
    command = next(a for a in ssh if a.startswith("--command="))
    assert f"python -m lcm_jax.train --jax_distributed {TRAIN_ARGS} 2>&1" in command
    assert "gcloud storage cp - gs://b/runs/x/logs/$(hostname).log" in command
    assert "gcloud storage cp gs://b/runs/x/code/lcm-jax.tar.gz" in command


def test_tpu_pod_rejects_a_local_workdir():
    out = _launch("tpu_pod_lcd.py", "--tpu", "t1", "--zone", "z", "--accelerator", "v5p-8",
                  "--config", "c.py", "--workdir", "runs/x", "--dry-run")
    assert out.returncode != 0 and "--workdir runs/x: must be a gs:// URL" in out.stderr


def test_slurm_dry_run():
    out = _launch("slurm_gpu_lcd.py", "--nodes", "4", "--gpus-per-node", "8", "--partition", "a100", *RUN)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("# 4 nodes x 8 GPUs = 4 processes, 32 devices; coordinator: first node port 12355")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=a100",
                 'export COORD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):12355"'):
        assert line in text.splitlines(), line
    srun = [line for line in text.splitlines() if line.startswith("srun")][-1]
    assert srun.endswith(f"python -m lcm_jax.train {TRAIN_ARGS} "
                         '--coordinator="$COORD" --num_processes="$SLURM_NTASKS"')
    assert "--process_id=$SLURM_PROCID" in srun
    assert text.splitlines()[-1] == "sbatch /tmp/lcm-jax.sbatch"
    assert "gcloud storage cp /tmp/lcm-jax.tar.gz gs://b/runs/x/code/lcm-jax.tar.gz" in text
