"""Distillation on SLURM GPU nodes: one sbatch job, one process per node (all its GPUs), process 0
on the first node as JAX's coordinator; checkpoints, metrics and the job log go to the workdir.

    python experiments/slurm_gpu_lcd.py --nodes 4 --gpus-per-node 8 --partition gpu \
        --config configs/sd15_lcd.py:gs://bucket/sd15 --workdir gs://bucket/runs/sd15 \
        --set data.source=webdataset --set "data.path=gs://bucket/shards/{00000..01023}.tar" \
        --set mesh.fsdp=8 [--dry-run]

The code is the checked-out commit, archived into the workdir and installed in each node's
job-local folder, so a resubmitted job (it resumes from the latest checkpoint) runs the same tree.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import CODE_ARCHIVE, add_run_flags, archive_commands, check_workdir, execute, train_command  # noqa: E402

COORDINATOR_PORT = 12355


def sbatch_script(args) -> str:
    """The job: every node fetches and installs the archive, then srun starts one trainer per node."""
    work = args.workdir.rstrip("/")
    # $COORD and $SLURM_NTASKS expand in the job's shell, $SLURM_PROCID in each task's own
    train = (shlex.join(train_command(args, [])) + ' --coordinator="$COORD" --num_processes="$SLURM_NTASKS"')
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --time={args.time}",
        *([f"#SBATCH --partition={args.partition}"] if args.partition else []),
        "#SBATCH --output=slurm-%j.log",
        "set -euo pipefail",
        f'export COORD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):{COORDINATOR_PORT}"',
        'CODE="${SLURM_TMPDIR:-/tmp}/lcm-jax-$SLURM_JOB_ID"',
        f"srun --ntasks-per-node=1 bash -c 'mkdir -p $0 && gcloud storage cp {work}/{CODE_ARCHIVE} $0/code.tar.gz"
        f" && tar -xzf $0/code.tar.gz -C $0 && pip install -q -e $0/lcm-jax \"jax[cuda12]\"' \"$CODE\"",
        f"srun --ntasks-per-node=1 --chdir=\"$CODE/lcm-jax\" bash -c 'exec \"$@\" --process_id=$SLURM_PROCID' "
        f"lcm-jax {train}",
        f"gcloud storage cp \"slurm-$SLURM_JOB_ID.log\" {work}/logs/",
    ]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--partition", default="")
    parser.add_argument("--time", default="48:00:00", help="the job's wall-clock limit")
    parser.add_argument("--job-name", default="lcm-jax")
    add_run_flags(parser)
    args = parser.parse_args(argv)
    check_workdir(args.workdir)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise SystemExit(f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node}: both must be >= 1")
    script = sbatch_script(args)
    print(f"# {args.nodes} nodes x {args.gpus_per_node} GPUs = {args.nodes} processes, "
          f"{args.nodes * args.gpus_per_node} devices; coordinator: first node port {COORDINATOR_PORT}; "
          f"workdir {args.workdir}")
    path = f"/tmp/{args.job_name}.sbatch"
    print(f"# {path}:\n{script}", end="")
    if not args.dry_run:
        with open(path, "w") as f:
            f.write(script)
    execute(archive_commands(args.workdir) + [["sbatch", path]], args.dry_run)


if __name__ == "__main__":
    main()
