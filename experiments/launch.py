"""What the launchers share: the train command line, the code archive, and running (or, with
--dry-run, printing) each command. Used by tpu_pod_lcd.py and slurm_gpu_lcd.py."""
from __future__ import annotations

import argparse
import shlex
import subprocess
from typing import Sequence

CODE_ARCHIVE = "code/lcm-jax.tar.gz"   # under the workdir: the exact tree every worker runs


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config, path.py[:ARG] (ARG: the teacher folder)")
    parser.add_argument("--workdir", required=True, help="run directory: gs://bucket/runs/NAME")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, passed as --config.KEY=VALUE (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def check_workdir(workdir: str) -> None:
    if not workdir.startswith("gs://"):
        raise SystemExit(f"--workdir {workdir}: must be a gs:// URL every worker can write")


def train_command(args: argparse.Namespace, distributed: Sequence[str]) -> list[str]:
    """`python -m lcm_jax.train` with the launch's distributed flags and config overrides."""
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set {item}: expected KEY=VALUE, e.g. mesh.fsdp=4")
    return (["python", "-m", "lcm_jax.train", *distributed, f"--config={args.config}",
             f"--workdir={args.workdir}"] + [f"--config.{item}" for item in args.set])


def archive_commands(workdir: str) -> list[list[str]]:
    """The checked-out commit as a tarball in the workdir (workers install exactly this)."""
    url = f"{workdir.rstrip('/')}/{CODE_ARCHIVE}"
    return [["git", "archive", "--format=tar.gz", "--prefix=lcm-jax/", "-o", "/tmp/lcm-jax.tar.gz", "HEAD"],
            ["gcloud", "storage", "cp", "/tmp/lcm-jax.tar.gz", url]]


def execute(commands: Sequence[Sequence[str]], dry_run: bool) -> None:
    """Runs each command in turn (stopping at the first failure), or prints them."""
    for cmd in commands:
        print(shlex.join(cmd), flush=True)
        if not dry_run:
            subprocess.run(cmd, check=True)
