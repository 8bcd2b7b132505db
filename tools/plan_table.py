"""The README's planning table: SD 1.5 and SDXL, LCD and LCM-LoRA, compiled ahead of time for
TPU slices by `lcm_jax.planning` (the planner behind `lcm-jax plan`), one row per compile.

    python tools/plan_table.py --out docs/plan_table.jsonl [--rows sd15:lcd:v5e-16 ...] [--jobs 2] [--opt-level O0]

A row is model:method:slice with the settings of SETTINGS; `:key=value,...` after it replaces or
adds settings (e.g. `sdxl:lcm_lora:v5e-16:mesh.data=4,mesh.fsdp=4`) and is a row of its own.

Each row compiles in its own process (a compile of an SD-size step takes minutes of CPU and
libtpu's memory is freed when the process ends; `--jobs 2` runs two at once, XLA compiles mostly
on one core). Rows already in --out are kept, so an interrupted table resumes. The models are
config-only folders (`planning.config_folder`): no weights, no hub. `--opt-level O0` compiles at
XLA's lowest optimisation level (several times faster; the row says so). Prints the markdown table
of every row in --out (the README's).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {("sd15", "lcd"): "configs/sd15_lcd.py", ("sd15", "lcm_lora"): "configs/sd15_lcm_lora.py",
           ("sdxl", "lcd"): "configs/sdxl_lcd.py", ("sdxl", "lcm_lora"): "configs/sdxl_lcm_lora.py"}
DEVICES = {"v5e-16": 16, "v5p-8": 4, "v4-32": 16}
# The settings each row compiles with: LCD trains the whole UNet, so parameters, Adam and the EMA
# target are split over fsdp and blocks are rematerialised; LCM-LoRA replicates its frozen
# teacher and trains data-parallel. Activations are bf16 everywhere (the recipes' default).
SETTINGS = {"lcd": ["mesh.data=1", "mesh.fsdp={n}", "model.remat=True", "model.teacher_dtype=bfloat16"],
            "lcm_lora": ["mesh.data={n}", "mesh.fsdp=1", "model.remat=True"]}
PER_DEVICE_BATCH = {"sd15": 4, "sdxl": 1}
ALL_ROWS = [f"{m}:{k}:{t}" for m in ("sd15", "sdxl") for k in ("lcd", "lcm_lora") for t in DEVICES]


def row_settings(row: str) -> tuple[str, list[str], int]:
    """A row is model:method:slice, optionally :key=value,... replacing or adding to SETTINGS."""
    model, method, topology, *changes = row.split(":", 3)
    n = DEVICES[topology]
    settings = [s.format(n=n) for s in SETTINGS[method]]
    for change in changes[0].split(",") if changes else []:
        settings = [s for s in settings if s.split("=")[0] != change.split("=")[0]] + [change]
    return CONFIGS[model, method], settings, PER_DEVICE_BATCH[model] * n


def row_config(row: str):
    from lcm_jax import planning
    from lcm_jax.cli import load_config

    config_file, overrides, batch = row_settings(row)
    model = row.split(":")[0]
    folder = planning.config_folder(model, os.path.join(tempfile.mkdtemp(), model))
    return load_config(f"{ROOT}/{config_file}:{folder}", overrides), overrides, batch


def plan_row(row: str) -> dict:
    """Compiles one row in this process; its figures as a JSON-able dict."""
    from lcm_jax import planning

    config, overrides, batch = row_config(row)
    topology = row.split(":")[2]
    t0 = time.time()
    plan = planning.plan_step(config, topology, batch)
    return {"row": row, "settings": overrides, "opt_level": plan.opt_level, "devices": plan.devices,
            "per_device_batch": batch // plan.devices,
            "state_bytes": plan.state_bytes, "frozen_bytes": plan.frozen_bytes, "temp_bytes": plan.temp_bytes,
            "total_bytes": plan.total_bytes, "hbm_bytes": plan.chip.hbm_bytes, "fits": plan.fits,
            "refused": plan.refused, "flops": plan.flops, "bytes_accessed": plan.bytes_accessed,
            "step_time_s": plan.step_time,
            "peak_flops": plan.chip.peak_bf16_flops, "compile_s": round(time.time() - t0, 1)}


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| model | method | slice (chips) | settings | batch / chip | params + Adam + EMA GiB | "
             "frozen GiB | XLA temp GiB | total / HBM GiB | fits | TFLOP / step / chip | roofline step | MFU |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        model, method, topology = r["row"].split(":")[:3]
        settings = ", ".join([s for s in r["settings"] if s not in ("mesh.data=1", "mesh.fsdp=1")]
                             + ([f"XLA {r['opt_level']}"] if r.get("opt_level") else []))
        state, frozen = sum(r["state_bytes"].values()), sum(r["frozen_bytes"].values())
        head = f"| {model} | {method} | {topology} ({r['devices']}) | {settings} | {r['per_device_batch']} | " \
               f"{_gib(state)} | {_gib(frozen)} |"
        if r["refused"]:
            lines.append(head + " - | - | no: compiler refused (out of memory) | - | - | - |")
            continue
        t = r["step_time_s"]
        lines.append(head + f" {_gib(r['temp_bytes'])} | {_gib(r['total_bytes'])} / {_gib(r['hbm_bytes'])} | "
                     f"{'yes' if r['fits'] else 'no'} | {r['flops'] / 1e12:.2f} | {t * 1e3:.0f} ms | "
                     f"{r['flops'] / (t * r['peak_flops']):.0%} |")
    return "\n".join(lines)


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def stored_table(path: str) -> str:
    """The README's table: every row stored in `path`, ALL_ROWS first, then the others in file order."""
    rows = {r["row"]: r for r in _read(path)}
    return markdown([rows[r] for r in ALL_ROWS if r in rows] + [r for k, r in rows.items() if k not in ALL_ROWS])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/plan_table.jsonl")
    ap.add_argument("--rows", nargs="+", default=ALL_ROWS, help="model:method:slice[:key=value,...], e.g. sd15:lcd:v5e-16 or "
                    "sdxl:lcm_lora:v5e-16:mesh.data=4,mesh.fsdp=4")
    ap.add_argument("--jobs", type=int, default=1)
    from lcm_jax.planning import OPT_LEVELS
    ap.add_argument("--opt-level", choices=OPT_LEVELS, default=None,
                    help="XLA optimisation level of the compiles (default: XLA's)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a worker: plan rows here
    args = ap.parse_args()
    if args.one:
        for row in args.rows:
            line = json.dumps(plan_row(row))
            with open(args.out, "a") as f:
                f.write(line + "\n")
        return
    done = {r["row"] for r in _read(args.out)}
    todo = [r for r in args.rows if r not in done]
    running: list[tuple[str, subprocess.Popen, float]] = []
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.opt_level:
        env["JAX_OPTIMIZATION_LEVEL"] = args.opt_level  # read by JAX in each worker
    while todo or running:
        while todo and len(running) < args.jobs:
            row = todo.pop(0)
            cmd = [sys.executable, __file__, "--one", "--out", args.out, "--rows", row]
            running.append((row, subprocess.Popen(cmd, cwd=ROOT, env=env), time.time()))
            print(f"compiling {row} ({len(todo)} left after it)", flush=True)
        time.sleep(5)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            print(f"{item[0]}: exit {item[1].returncode} after {time.time() - item[2]:.0f} s", flush=True)
    print(stored_table(args.out))


if __name__ == "__main__":
    main()
