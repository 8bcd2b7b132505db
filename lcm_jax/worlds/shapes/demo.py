"""The main job on the bundled default: distill an LCM (and an LCM-LoRA) from the shipped shapes
teacher on CPU, then compare 1, 2 and 4 step sampling against the teacher's DDIM / DPM-Solver++.

    python -m lcm_jax.demo --workdir=runs/demo        # what `make demo` runs

Writes to the workdir: latents/ (the latent cache both runs read), lcd/ and lora/ (training runs: checkpoints, metrics.jsonl, TensorBoard,
samples/), grid.png (the same prompts at 1, 2, 4 LCM steps beside the teacher's 50 DDIM steps),
quality.md and quality.png (the steps-vs-quality table), endpoint.png (the student's one-step
distance to the teacher's ODE endpoint during distillation).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from lcm_jax.worlds.shapes import SAMPLE_STEPS, TEACHER_GUIDANCE


def load_config(arg: str | None = None, teacher: str | None = None):
    """configs/shapes_lcd.py of this package (installed or not), with another teacher folder."""
    from lcm_jax.worlds.shapes.configs import shapes_lcd

    config = shapes_lcd.get_config(arg)
    if teacher:
        config.model.teacher = teacher
    if not os.path.exists(os.path.join(config.model.teacher, "model_index.json")):
        raise SystemExit(f"no teacher pipeline at {config.model.teacher}: rebuild it with "
                         "`python -m lcm_jax.worlds.shapes.build_teacher` or pass --teacher")
    return config


def distill(arg: str | None, workdir: str, steps: int, teacher: str | None, cache_dir: str):
    """Runs (or resumes) one distillation on the latent cache in `cache_dir`; returns the
    pipeline over its student."""
    from lcm_jax import train
    from lcm_jax.runs import pipeline_from_training
    from lcm_jax.training.models import build_models

    config = load_config(arg, teacher)
    config.total_steps = steps
    config.checkpoint_every = min(config.checkpoint_every, steps)
    config.sample_every = min(config.sample_every, steps)
    config.data.cache_dir = cache_dir
    state = train.train_and_evaluate(config, workdir)
    return pipeline_from_training(config, build_models(config), state), config


def write_grid(path: str, teacher, lcm, lcm_guidance: float, prompts) -> None:
    from lcm_jax.evaluation.grids import save_grid
    from lcm_jax.evaluation.harness import generate

    rows = [generate(teacher, prompts, "ddim", 50, TEACHER_GUIDANCE, batch=len(prompts))]
    rows += [generate(lcm, prompts, "lcm", n, lcm_guidance, batch=len(prompts)) for n in (1, 2, 4)]
    save_grid(np.concatenate(rows), path, nrow=len(prompts),
              labels=["teacher DDIM 50", "LCM 1 step", "LCM 2 steps", "LCM 4 steps"])


def run(workdir: str, lcd_steps: int, lora_steps: int, num_prompts: int,
        teacher: str | None = None) -> list:
    from lcm_jax.evaluation.harness import one_step_distances, quality_runs, steps_quality_table
    from lcm_jax.evaluation.report import (endpoint_markdown, plot_endpoint_errors, plot_table,
                                           read_endpoint_errors, table_markdown)
    from lcm_jax.pipeline import LCMPipeline
    from lcm_jax.training import latent_cache
    from lcm_jax.training.state import sampling_guidance
    from lcm_jax.worlds.shapes.evaluator import ShapesEvaluator, heldout_prompts

    t0 = time.time()
    config = load_config(None, teacher)
    latents = os.path.join(workdir, "latents")  # encoded once, read by both runs
    print(f"[0/4] encoding {config.data.cache_size} examples into the latent cache {latents}", flush=True)
    latent_cache.build(config, latents)
    print(f"[1/4] distilling an LCM from {config.model.teacher} ({lcd_steps} steps)", flush=True)
    lcm, config = distill(None, os.path.join(workdir, "lcd"), lcd_steps, teacher, latents)
    lora = None
    if lora_steps:
        print(f"[2/4] distilling an LCM-LoRA ({lora_steps} steps)", flush=True)
        lora, _ = distill("lora", os.path.join(workdir, "lora"), lora_steps, teacher, latents)
    teacher = LCMPipeline.from_pretrained(config.model.teacher)
    lcm_guidance = sampling_guidance(config)
    prompts, _ = heldout_prompts(num_prompts)
    print("[3/4] sample grid", flush=True)
    write_grid(os.path.join(workdir, "grid.png"), teacher, lcm, lcm_guidance, prompts[:8])
    print(f"[4/4] quality table on {num_prompts} held-out prompts", flush=True)
    runs = quality_runs(teacher, lcm, lora, lcm_guidance, TEACHER_GUIDANCE, SAMPLE_STEPS)
    rows = steps_quality_table(runs, ShapesEvaluator(), prompts, batch=min(100, num_prompts))
    # The map LCD distills: the student's one step against the teacher's ODE endpoint (50 DDIM
    # steps at the same guidance, same noise); before distillation the student is the teacher's
    # own one-step x0 without CFG (its w-embedding starts at zero).
    n = min(100, num_prompts)
    before, after = one_step_distances([(teacher, 1.0), (lcm, lcm_guidance)], teacher, prompts[:n],
                                       lcm_guidance, batch=n)
    distance = (f"One-step image vs the teacher's 50-step DDIM image from the same noise (guidance "
                f"{lcm_guidance:g}, RMS over pixels in [0, 1], {n} prompts): before distillation "
                f"{before:.4f}, after {after:.4f}.\n")
    print(distance, end="")
    endpoint = ""
    if config.get("eval_endpoint_timesteps"):
        # The same map in latent space during training, from each of the 4-step sampler's timesteps.
        steps, errors = read_endpoint_errors(os.path.join(workdir, "lcd", "metrics.jsonl"))
        plot_endpoint_errors(steps, errors, os.path.join(workdir, "endpoint.png"))
        endpoint = (f"\nOne-step latent MSE to the teacher's ODE endpoint (N = "
                    f"{config.loss.num_ddim_timesteps} DDIM chain, guidance {lcm_guidance:g}) from noised "
                    f"training latents, by start timestep, during LCD:\n\n"
                    + endpoint_markdown(steps, errors))
        print(endpoint, end="")
    with open(os.path.join(workdir, "quality.md"), "w") as f:
        f.write(f"# Steps vs quality on the shapes world ({num_prompts} held-out prompts)\n\n")
        f.write(table_markdown(rows))
        f.write("\n" + distance + endpoint)
    plot_table(rows, os.path.join(workdir, "quality.png"))
    print(f"\ndone in {(time.time() - t0) / 60:.1f} min. Wrote:")
    for name in ("latents", "lcd", "lora", "grid.png", "quality.md", "quality.png", "endpoint.png"):
        if os.path.exists(os.path.join(workdir, name)):
            print(f"  {os.path.join(workdir, name)}")
    print("\n" + table_markdown(rows))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--lcd_steps", type=int, default=None, help="default: the config's total_steps")
    p.add_argument("--lora_steps", type=int, default=None, help="0 skips LCM-LoRA")
    p.add_argument("--num_prompts", type=int, default=500, help="held-out prompts of the quality table")
    p.add_argument("--teacher", default=None, help="default: the shipped shapes teacher")
    args = p.parse_args(argv)
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    config = load_config(None, args.teacher)
    lcd = args.lcd_steps if args.lcd_steps is not None else config.total_steps
    lora = args.lora_steps if args.lora_steps is not None else config.total_steps // 4
    run(args.workdir, lcd, lora, args.num_prompts, args.teacher)


if __name__ == "__main__":
    sys.exit(main())
