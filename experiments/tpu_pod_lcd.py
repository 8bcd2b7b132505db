"""Distillation on a TPU VM slice: create it (or reuse it), install this commit on every worker,
run the trainer on all workers at once; checkpoints, metrics and each worker's log go to gs://.

    python experiments/tpu_pod_lcd.py --tpu my-tpu --zone us-west4-a --accelerator v5litepod-16 \
        --config configs/sd15_lcd.py:gs://bucket/sd15 --workdir gs://bucket/runs/sd15 \
        --set data.source=webdataset --set "data.path=gs://bucket/shards/{00000..01023}.tar" \
        --set mesh.data=1 --set mesh.fsdp=16 [--spot] [--dry-run]

Rerunning the same command reuses the slice and resumes the run from its latest checkpoint.
Check first that the step fits: `lcm-jax plan --config ... --topology v5e-16`. Every worker runs
the trainer with --jax_distributed: JAX reads the slice's workers from the TPU metadata server,
and process 0 (worker 0) is the coordinator.
"""
from __future__ import annotations

import argparse
import re
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import CODE_ARCHIVE, add_run_flags, archive_commands, check_workdir, execute, train_command  # noqa: E402

# TensorCores per chip (the number in an accelerator name counts cores) and chips per host.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v6e": 1}
CHIPS_PER_HOST = 4
SINGLE_HOST_MAX = {"v5litepod": 8, "v6e": 8}   # these slices put up to 8 chips on one host
ALIASES = {"v5e": "v5litepod"}                  # the planner's name -> gcloud's
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
            "v6e": "v2-alpha-tpuv6e"}           # TPU VM images (cloud.google.com/tpu/docs/runtimes)
COORDINATOR_PORT = 8476                         # JAX's default on TPU (worker 0)


def slice_shape(accelerator: str) -> tuple[str, int, int]:
    """(gcloud accelerator type, chips, workers) of e.g. 'v5litepod-16' or 'v5e-16'."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator)
    if not m:
        raise SystemExit(f"--accelerator {accelerator}: expected v4-N, v5p-N, v5litepod-N (v5e-N) or v6e-N")
    family = ALIASES.get(m.group(1), m.group(1))
    chips = int(m.group(2)) // CORES_PER_CHIP[family]
    single = SINGLE_HOST_MAX.get(family, CHIPS_PER_HOST)
    workers = 1 if chips <= single else chips // CHIPS_PER_HOST
    return f"{family}-{m.group(2)}", chips, workers


def tpu_vm(args, verb: str, *rest: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, args.tpu, f"--zone={args.zone}", *rest]


def slice_exists(args) -> bool:
    return subprocess.run(tpu_vm(args, "describe"), capture_output=True).returncode == 0


def worker_script(args) -> str:
    """What each worker runs: fetch and install this commit, train, stream the log to gs://."""
    code = f"{args.workdir.rstrip('/')}/{CODE_ARCHIVE}"
    log = f"{args.workdir.rstrip('/')}/logs/$(hostname).log"
    train = shlex.join(train_command(args, ["--jax_distributed"]))
    return (f"set -o pipefail; gcloud storage cp {code} /tmp/lcm-jax.tar.gz && rm -rf ~/lcm-jax && "
            f"tar -xzf /tmp/lcm-jax.tar.gz -C ~ && cd ~/lcm-jax && "
            f"pip install -q -e . 'jax[tpu]' && "
            f"{train} 2>&1 | tee /dev/stderr | gcloud storage cp - {log}")


def commands(args, create: bool) -> list[list[str]]:
    accelerator, _, _ = slice_shape(args.accelerator)
    version = args.version or RUNTIMES[accelerator.split("-")[0]]
    out = []
    if create:
        out.append(tpu_vm(args, "create", f"--accelerator-type={accelerator}", f"--version={version}",
                          *(["--spot"] if args.spot else [])))
    out += archive_commands(args.workdir)
    out.append(tpu_vm(args, "ssh", "--worker=all", f"--command={worker_script(args)}"))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tpu", required=True, help="TPU VM name (created when it does not exist)")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--accelerator", required=True, help="e.g. v5litepod-16 (v5e-16), v5p-8, v4-32, v6e-8")
    parser.add_argument("--version", default=None, help="TPU VM runtime image (default: the chip's)")
    parser.add_argument("--spot", action="store_true", help="create a spot (preemptible) slice")
    parser.add_argument("--create", choices=("auto", "yes", "no"), default="auto",
                        help="auto: create the slice when `describe` does not find it (dry-run: yes)")
    add_run_flags(parser)
    args = parser.parse_args(argv)
    check_workdir(args.workdir)
    accelerator, chips, workers = slice_shape(args.accelerator)
    print(f"# slice {args.tpu}: {accelerator}, {chips} chips, {workers} workers; coordinator: worker 0 "
          f"port {COORDINATOR_PORT} (TPU metadata); workdir {args.workdir}; logs {args.workdir.rstrip('/')}/logs/")
    create = args.create == "yes" or (args.create == "auto" and (args.dry_run or not slice_exists(args)))
    execute(commands(args, create), args.dry_run)


if __name__ == "__main__":
    main()
