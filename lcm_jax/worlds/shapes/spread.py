"""How far the quality table's numbers move with the prompts: its rows, and the aims distillation
is judged by (README, Status), on K disjoint sets of held-out prompts.

    python -m lcm_jax.worlds.shapes.spread runs/demo/lcd [[LABEL=]WORKDIR ...] --sets 4 --num_prompts 500

Set 0 is the demo's quality table: the first `num_prompts` prompts of the eval split and starting
noise seed 0 (its rows repeat the table's to the last digit). Set s takes the next `num_prompts`
prompts and seed 1000 s. On every set: the teacher's 50 DDIM steps, DDIM / DPM-Solver++ and the
undistilled student under the LCM sampler at 1, 2 and 4 steps, and each run's LCM or LCM-LoRA
(its latest checkpoint, at the run's sampling guidance) at 1, 2 and 4 steps. Writes
OUT/spread.jsonl (a row per set and sampler setting), OUT/spread.md (FD and prompt accuracy as
mean, standard deviation and range over the sets, and each aim's ratio on every set with how
many sets meet it) and OUT/spread.png (each aim's ratio over its bound, set by set). A ratio
that crosses its bound between sets is not a result at this many prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Callable, Sequence

import numpy as np

from lcm_jax import fs
from lcm_jax.worlds.shapes import SAMPLE_STEPS, TEACHER_GUIDANCE

SEED_STRIDE = 1000     # set s samples its starting noise from seed SEED_STRIDE * s
TEACHER = ("teacher", "ddim", 50)
TITLE = "# How far the shapes quality table moves with the prompts\n\n"


@dataclasses.dataclass(frozen=True)
class Aim:
    label: str
    row: tuple             # (model, sampler, steps) judged
    reference: tuple       # (model, sampler, steps) it is judged against
    metric: str            # 'fd' (met when the ratio is at most `bound`) or 'prompt_accuracy' (at least)
    bound: float

    def met(self, ratio: float) -> bool:
        return ratio <= self.bound if self.metric == "fd" else ratio >= self.bound

    def margin(self, ratio: float) -> float:
        """The ratio in units of the bound, oriented so that at most 1 is met."""
        return ratio / self.bound if self.metric == "fd" else self.bound / ratio


def aims(model: str) -> list[Aim]:
    """The aims for the LCM rows named `model`: half the FD of the undistilled student,
    DDIM and DPM-Solver++ at 1, 2 and 4 steps; FD within 2x / 1.2x / 1x of the teacher's 50 DDIM
    steps at 1 / 2 / 4 steps, and 4 steps with at least 0.95x its prompt accuracy."""
    out = [Aim(f"{n} step{'s' * (n > 1)}: FD at most 0.5x {name}", (model, "lcm", n),
               ("teacher", sampler, n), "fd", 0.5)
           for n in SAMPLE_STEPS
           for name, sampler in (("the undistilled student", "lcm"), ("DDIM", "ddim"), ("DPM-Solver++", "dpm"))]
    out += [Aim(f"{n} step{'s' * (n > 1)}: FD at most {b:g}x the teacher's 50 steps", (model, "lcm", n),
                TEACHER, "fd", b) for n, b in zip(SAMPLE_STEPS, (2.0, 1.2, 1.0))]
    out.append(Aim(f"{SAMPLE_STEPS[-1]} steps: prompt accuracy at least 0.95x the teacher's 50 steps",
                   (model, "lcm", SAMPLE_STEPS[-1]), TEACHER, "prompt_accuracy", 0.95))
    return out


def prompt_sets(num_sets: int, num_prompts: int) -> list[tuple[list[str], int]]:
    """(prompts, noise seed) of each disjoint set; set 0 is the quality table's."""
    from lcm_jax.worlds.shapes.evaluator import heldout_prompts

    prompts, _ = heldout_prompts(num_sets * num_prompts)
    return [(prompts[s * num_prompts:(s + 1) * num_prompts], SEED_STRIDE * s) for s in range(num_sets)]


def key(row: dict) -> tuple:
    return row["model"], row["sampler"], row["steps"]


def summary(rows: Sequence[dict]) -> list[dict]:
    """Per (model, sampler, steps), in first-seen order: each metric's mean, sd (ddof 1), min, max."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    out = []
    for k, rs in groups.items():
        entry = dict(zip(("model", "sampler", "steps"), k), sets=len(rs))
        for metric in ("fd", "prompt_accuracy"):
            v = np.array([r[metric] for r in rs], np.float64)
            entry[metric] = dict(mean=v.mean(), sd=v.std(ddof=1) if len(v) > 1 else float("nan"),
                                 min=v.min(), max=v.max())
        out.append(entry)
    return out


def aim_ratios(rows: Sequence[dict], aim: Aim) -> list[float]:
    """The aim's ratio on every set, in set order (paired: same prompts and noise)."""
    by_set = {(r["set"], key(r)): r[aim.metric] for r in rows}
    sets = sorted({r["set"] for r in rows if key(r) == aim.row})
    return [by_set[(s, aim.row)] / by_set[(s, aim.reference)] for s in sets]


def _models(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows if r["model"] != "teacher"))


def aims_table(models: Sequence[str], cell: Callable[[Aim], str]) -> str:
    """One line per aim, one column per model, `cell(aim)` in each (the aim for that model)."""
    lines = ["| aim | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for same_aim in zip(*(aims(m) for m in models)):  # one aim, each model's
        lines.append(f"| {same_aim[0].label} | " + " | ".join(cell(a) for a in same_aim) + " |")
    return "\n".join(lines) + "\n"


def aims_markdown(rows: Sequence[dict]) -> str:
    """One line per aim, one column per run: on how many sets it is met, and the mean ratio."""
    def cell(a: Aim) -> str:
        r = aim_ratios(rows, a)
        return f"{sum(a.met(x) for x in r)} of {len(r)} ({np.mean(r):.2f}x)"

    return aims_table(_models(rows), cell)


def markdown(rows: Sequence[dict], num_prompts: int) -> str:
    """The page spread.md holds: the summary table, the aims by run, then each run's aims set by set."""
    sets = len({r["set"] for r in rows})
    lines = [f"FD and prompt accuracy over {sets} disjoint sets of {num_prompts} held-out prompts "
             "(set 0 is the quality table's)\n",
             "| model | sampler | steps | FD mean | FD sd | FD min - max | accuracy mean | accuracy sd |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    for e in summary(rows):
        fd, acc = e["fd"], e["prompt_accuracy"]
        lines.append(f"| {e['model']} | {e['sampler']} | {e['steps']} | {fd['mean']:.1f} | {fd['sd']:.1f} "
                     f"| {fd['min']:.1f} - {fd['max']:.1f} | {acc['mean']:.3f} | {acc['sd']:.3f} |")
    lines += ["", "Each aim: on how many sets it is met (mean ratio over the sets)\n", aims_markdown(rows)]
    for model in _models(rows):
        lines += [f"Aims for {model}, ratio on each set\n", "| aim | ratio by set | met on |", "|---|---|---:|"]
        for aim in aims(model):
            r = aim_ratios(rows, aim)
            lines.append(f"| {aim.label} | {' / '.join(f'{x:.3f}' for x in r)} | {sum(aim.met(x) for x in r)} "
                         f"of {len(r)} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: str) -> None:
    """Every aim's margin (ratio over bound; at most 1 is met) on each set, a colour per run, log
    scale, the bound a dashed line."""
    from lcm_jax.evaluation.report import _pyplot, _save

    plt = _pyplot()
    models = _models(rows)
    labels = [a.label for a in aims(models[0])]
    fig, ax = plt.subplots(figsize=(12, 6.5))
    width = 0.8 / len(models)
    for j, model in enumerate(models):
        for i, aim in enumerate(aims(model)):
            margins = [aim.margin(r) for r in aim_ratios(rows, aim)]
            ax.scatter([i - 0.4 + width * (j + 0.5)] * len(margins), margins, s=14,
                       color=plt.cm.tab10(j % 10), label=model if i == 0 else None)
    ax.axhline(1.0, ls="--", c="k", label="the aim's bound (at or below: met)")
    ax.set(yscale="log", ylabel="ratio / bound, one dot per prompt set (log scale)")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def load_run(label: str, workdir: str):
    """(label or '', run workdir) -> (label, pipeline over the run's latest checkpoint, its sampling
    guidance, its teacher folder). A run that does not sample with the LCM sampler is refused
    before anything is restored."""
    from lcm_jax.runs import pipeline_from_training
    from lcm_jax.training.checkpoints import load_run_config, restore
    from lcm_jax.training.models import build_models
    from lcm_jax.training.state import sampling_guidance

    config = load_run_config(workdir)
    if config.method not in ("lcd", "lcm_lora"):
        raise SystemExit(f"{workdir}: method {config.method!r} does not sample with the LCM sampler; "
                         "pass LCD or LCM-LoRA run workdirs")
    restored = restore(workdir)
    label = label or f"LCM {os.path.normpath(workdir)} @{int(restored.state.step)}"
    pipe = pipeline_from_training(config, build_models(config), restored.state)
    return label, pipe, sampling_guidance(config), config.model.teacher


def setting_runs(teacher, runs: Sequence[tuple]) -> list[tuple]:
    """The quality table's (name, pipe, sampler, steps, guidance) settings, one LCM per run."""
    from lcm_jax.evaluation.harness import quality_runs

    out = [r for r in quality_runs(teacher, None, None, 0.0, TEACHER_GUIDANCE, SAMPLE_STEPS)
           if r[0] == "teacher"]
    return out + [(label, pipe, "lcm", n, g) for label, pipe, g, _ in runs for n in SAMPLE_STEPS]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+", help="LCD / LCM-LoRA run workdirs, each as WORKDIR or LABEL=WORKDIR")
    p.add_argument("--sets", type=int, default=4)
    p.add_argument("--num_prompts", type=int, default=500)
    p.add_argument("--out", default=None,
                   help="folder for spread.md / .png / .jsonl (default: the first workdir's parent)")
    args = p.parse_args(argv)
    if args.sets < 2:
        raise SystemExit(f"--sets {args.sets}: a spread needs at least 2 prompt sets")
    from lcm_jax.evaluation.harness import steps_quality_table
    from lcm_jax.pipeline import LCMPipeline
    from lcm_jax.worlds.shapes.evaluator import ShapesEvaluator

    named = [(label, workdir) for label, _, workdir in (w.rpartition("=") for w in args.workdirs)]
    labels = [label for label, _ in named]
    repeated = sorted({x for x in labels if x and (labels.count(x) > 1 or x == "teacher")})
    if repeated:
        raise SystemExit(f"run label(s) {', '.join(repeated)} name more than one row set; give each "
                         "run its own LABEL (not 'teacher')")
    runs = [load_run(label, workdir) for label, workdir in named]
    teachers = sorted({r[3] for r in runs})
    if len(teachers) > 1:
        raise SystemExit(f"the runs distill different teachers ({', '.join(teachers)}); pass runs of one")
    settings = setting_runs(LCMPipeline.from_pretrained(teachers[0]), runs)
    out = args.out or os.path.dirname(os.path.normpath(named[0][1]))
    evaluator, rows, t0 = ShapesEvaluator(), [], time.time()
    for s, (prompts, seed) in enumerate(prompt_sets(args.sets, args.num_prompts)):
        table = steps_quality_table(settings, evaluator, prompts, seed=seed, batch=min(100, args.num_prompts))
        rows += [dict(set=s, seed=seed, **dataclasses.asdict(r)) for r in table]
        eta = (time.time() - t0) / (s + 1) * (args.sets - s - 1)
        print(f"set {s + 1}/{args.sets} done ({time.time() - t0:.0f}s, ETA {eta:.0f}s)", flush=True)
    text = TITLE + markdown(rows, args.num_prompts)
    plot(rows, os.path.join(out, "spread.png"))
    fs.write_text_atomic(os.path.join(out, "spread.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    fs.write_text_atomic(os.path.join(out, "spread.md"), text)
    print("\n" + text + f"\nwrote {out}/spread.md, .png, .jsonl in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
