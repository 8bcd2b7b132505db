"""Quality over distillation: every checkpoint of a shapes LCD / LCM-LoRA run, sampled and scored.

    python -m lcm_jax.worlds.shapes.eval_checkpoints runs/demo/lcd --steps 1 2 4 8 --num_prompts 500

For the student before distillation (step 0) and each checkpoint the run kept, FD and prompt
accuracy (lcm_jax.worlds.shapes.evaluator.ShapesEvaluator) of LCM sampling at each step count, on the same
held-out prompts and starting noise, beside the teacher's 50 DDIM steps; with the endpoint error
the run logged at that step (metrics.jsonl, when config.eval_endpoint_timesteps is set), and with
--oracle the ideal LCM's row (the teacher's own CFG DDIM chain as the consistency function: what
LCD converges to, so the ceiling of the run). Writes
WORKDIR/quality_by_step.{md,png,jsonl} once every row is in, and prints each row as it is scored.

Use it to see whether a run converges: the demo's table scores only the last checkpoint. Keep
enough checkpoints (--config.keep_checkpoints) and evaluate on at least 500 prompts: the standard
error of prompt accuracy is about 0.02 there, 0.03 at the demo's 200.
"""
from __future__ import annotations

import argparse
import json
import os
import time

TEACHER_STEPS = 50


def checkpoint_steps(workdir: str, config) -> list[int]:
    from lcm_jax.training.checkpoints import checkpoint_manager

    mngr = checkpoint_manager(workdir, config, create=False)
    try:
        return sorted(int(s) for s in mngr.all_steps())
    finally:
        mngr.close()


def logged_endpoint(workdir: str) -> dict[int, dict[str, float]]:
    """{step: {"t999": mse, ...}} from the run's metrics.jsonl (empty when it logged none)."""
    from lcm_jax.evaluation.report import read_endpoint_errors

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    steps, errors = read_endpoint_errors(path)
    return {s: {f"t{t}": errors[t][i] for t in errors} for i, s in enumerate(steps)}


def markdown(rows: list[dict], sample_steps, teacher: dict) -> str:
    endpoint_keys = sorted({k for r in rows for k in r.get("endpoint", {})}, key=lambda k: -int(k[1:]))
    head = (["training step"] + [f"{n} step{'s' if n > 1 else ''} FD / acc" for n in sample_steps]
            + [f"endpoint MSE {k}" for k in endpoint_keys])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [str(r["step"])] + [f"{r['fd'][str(n)]:.2f} / {r['acc'][str(n)]:.3f}" for n in sample_steps]
        cells += [f"{r['endpoint'][k]:.4f}" if k in r.get("endpoint", {}) else "" for k in endpoint_keys]
        lines.append("| " + " | ".join(cells) + " |")
    if "oracle" in teacher:  # the ideal LCM: the teacher's chain as the consistency function
        o = teacher["oracle"]
        lines.append("| ideal LCM | " + " | ".join(f"{o[str(n)][0]:.2f} / {o[str(n)][1]:.3f}" for n in sample_steps)
                     + " |" + " |" * len(endpoint_keys))
    return (f"Teacher, {TEACHER_STEPS} DDIM steps, guidance {teacher['guidance']:g}: FD "
            f"{teacher['fd']:.2f}, prompt accuracy {teacher['acc']:.3f}.\n\n" + "\n".join(lines) + "\n")


def plot(rows: list[dict], sample_steps, teacher: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["step"] for r in rows]
    for n in sample_steps:
        ax_fd.plot(x, [r["fd"][str(n)] for r in rows], marker="o", label=f"LCM {n} step{'s' if n > 1 else ''}")
        ax_acc.plot(x, [r["acc"][str(n)] for r in rows], marker="o", label=f"LCM {n} step{'s' if n > 1 else ''}")
    for i, (ax, key) in enumerate(((ax_fd, "fd"), (ax_acc, "acc"))):
        ax.axhline(teacher[key], color="k", ls="--", label=f"teacher DDIM {TEACHER_STEPS}")
        for j, n in enumerate(sample_steps if "oracle" in teacher else ()):
            ax.axhline(teacher["oracle"][str(n)][i], color=f"C{j}", ls=":", label=f"ideal LCM {n}")
        ax.set_xlabel("distillation step")
    ax_fd.set_yscale("log")
    ax_fd.set_ylabel("FD (lower is better)")
    ax_acc.set_ylabel("prompt accuracy")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="a training workdir (config.json, checkpoints/)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="LCM sampling steps")
    p.add_argument("--num_prompts", type=int, default=500)
    p.add_argument("--guidance", type=float, default=None,
                   help="LCM guidance scale (default: the middle of the run's w range, plus 1; "
                        "1 for LCM-LoRA)")
    p.add_argument("--teacher_guidance", type=float, default=5.0)
    p.add_argument("--every", type=int, default=1, help="score every k-th kept checkpoint")
    p.add_argument("--oracle", action="store_true",
                   help="also score the ideal LCM at each step count (harness.oracle_generate: the "
                        "teacher's own CFG DDIM chain as the consistency function), the ceiling")
    p.add_argument("--batch", type=int, default=100)
    return p.parse_args(argv)


def scored_steps(args: argparse.Namespace, config) -> list[int]:
    """The kept checkpoints to score (every --every-th, always the last); refuses a run that is not
    a distillation run, or holds none, before anything is sampled."""
    if config.method not in ("lcd", "lcm_lora"):
        raise SystemExit(f"{args.workdir}: method {config.method!r} is not a distillation run "
                         "(lcd or lcm_lora)")
    steps = checkpoint_steps(args.workdir, config)
    if not steps:
        raise SystemExit(f"{args.workdir}/checkpoints holds no finished checkpoint")
    return steps[::-1][::args.every][::-1]


def teacher_reference(args, config, prompts, evaluator, guidance: float, batch: int) -> dict:
    """The teacher's 50 DDIM steps and, with --oracle, the ideal LCM at each step count."""
    from lcm_jax.evaluation.harness import generate, oracle_generate
    from lcm_jax.pipeline import LCMPipeline

    t0 = time.time()
    teacher_pipe = LCMPipeline.from_pretrained(config.model.teacher)
    m = evaluator(generate(teacher_pipe, prompts, "ddim", TEACHER_STEPS, args.teacher_guidance,
                           batch=batch), prompts)
    teacher = dict(guidance=args.teacher_guidance, fd=m["fd"], acc=m["prompt_accuracy"])
    print(f"teacher DDIM {TEACHER_STEPS} guidance {args.teacher_guidance:g}: FD {teacher['fd']:.2f} "
          f"acc {teacher['acc']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    if args.oracle:
        teacher["oracle"] = {}
        for n in args.steps:
            m = evaluator(oracle_generate(teacher_pipe, prompts, n, guidance, batch=batch,
                                          num_ddim_timesteps=config.loss.num_ddim_timesteps), prompts)
            teacher["oracle"][str(n)] = (float(m["fd"]), float(m["prompt_accuracy"]))
            print(f"ideal LCM {n} steps guidance {guidance:g}: FD {m['fd']:.2f} "
                  f"acc {m['prompt_accuracy']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    return teacher


def checkpoint_rows(args, config, steps, prompts, evaluator, guidance: float, batch: int) -> list[dict]:
    """A row per checkpoint (and the student before distillation, step 0): FD and accuracy at each
    step count, with the endpoint error the run logged; printed as each is scored."""
    import jax

    from lcm_jax.evaluation.harness import generate
    from lcm_jax.runs import pipeline_from_training
    from lcm_jax.training.checkpoints import restore
    from lcm_jax.training.models import build_models
    from lcm_jax.training.state import make_init_state, make_optimizer

    models = build_models(config)
    state0 = jax.jit(make_init_state(config, make_optimizer(config)[0]))(models.init_params)
    pipe = pipeline_from_training(config, models, state0)  # compiled once; weights swapped below
    endpoint = logged_endpoint(args.workdir)
    rows, t0 = [], time.time()
    for i, step in enumerate([0] + steps):
        t1 = time.time()
        if step:
            pipe.unet_params = pipeline_from_training(
                config, models, restore(args.workdir, step).state).unet_params
        row = dict(step=step, guidance=guidance, fd={}, acc={}, endpoint=endpoint.get(step, {}))
        for n in args.steps:
            m = evaluator(generate(pipe, prompts, "lcm", n, guidance, batch=batch), prompts)
            row["fd"][str(n)], row["acc"][str(n)] = float(m["fd"]), float(m["prompt_accuracy"])
        rows.append(row)
        scores = "  ".join(f"{n}: {row['fd'][str(n)]:7.2f} / {row['acc'][str(n)]:.3f}" for n in args.steps)
        eta = (time.time() - t0) / (i + 1) * (len(steps) - i)
        print(f"step {step:6d}  FD / acc  {scores}  ({time.time() - t1:.0f}s, ETA {eta:.0f}s)", flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    from lcm_jax import fs
    from lcm_jax.training.checkpoints import load_run_config
    from lcm_jax.training.state import sampling_guidance
    from lcm_jax.worlds.shapes.evaluator import ShapesEvaluator, heldout_prompts

    config = load_run_config(args.workdir)
    steps = scored_steps(args, config)
    guidance = sampling_guidance(config) if args.guidance is None else args.guidance
    prompts, _ = heldout_prompts(args.num_prompts)
    evaluator, batch = ShapesEvaluator(), min(args.batch, args.num_prompts)
    t0 = time.time()
    teacher = teacher_reference(args, config, prompts, evaluator, guidance, batch)
    rows = checkpoint_rows(args, config, steps, prompts, evaluator, guidance, batch)
    # Written once every row is in: an interrupted scoring leaves the previous outputs as they were.
    base = os.path.join(args.workdir, "quality_by_step")
    text = markdown(rows, args.steps, teacher)
    plot(rows, args.steps, teacher, base + ".png")
    fs.write_text_atomic(base + ".jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    fs.write_text_atomic(base + ".md", f"# LCM quality over distillation ({args.num_prompts} held-out "
                         f"prompts, guidance {guidance:g})\n\n" + text)
    print("\n" + text)
    print(f"wrote {base}.md, .png, .jsonl in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
