"""The methods table: every distillation recipe and method on the shapes world, same teacher, same
latent cache, same training budget, scored on the same held-out prompts and starting noise.

    python -m lcm_jax.worlds.shapes.methods --workdir runs/methods [--steps 1200] [--num_prompts 500]
        [--methods lcd,lcd_x0,...] [--teacher FOLDER]

Each method is the demo's config (configs/shapes_lcd.py) with TABLE_BASE and the overrides in METHODS, trained
into WORKDIR/<name>/ (resumable), then sampled at 1, 2 and 4 steps with its own sampler: FD and
prompt accuracy on --num_prompts held-out prompts (half of which leave attributes out), and the
per-caption diversity of 8 samples of --diversity_prompts under-stated prompts. Runs keep a slow
evaluation EMA of the student (eval_ema_decay) beside the target network, and both are scored.
The baselines share the table: the teacher's 50 DDIM steps, DDIM and DPM-Solver++ at the same
steps, the undistilled student under the LCM sampler, and with --oracle the ideal LCM (the
teacher's own ODE chain as the consistency function). Writes WORKDIR/methods.{jsonl,md,png}; finished methods are
read back from methods.jsonl, not redone.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from lcm_jax.worlds.shapes import SAMPLE_STEPS, TEACHER_GUIDANCE

EVAL_EMA = 0.999
IDEAL = "ideal LCM (the teacher's ODE chain)"  # the --oracle rows' method

# The table's common recipe, which every method changes: LCD at k = 20 (a grid of N = 50) with
# target EMA 0.995, the paper's grid (configs/shapes_lcd.py's before the table chose k = 100).
TABLE_BASE = {"loss.num_ddim_timesteps": 50, "loss.ema_decay": 0.995,
              "eval_endpoint_timesteps": (999, 759, 499, 259)}
K100 = {"loss.num_ddim_timesteps": 10, "eval_endpoint_timesteps": ()}  # a grid of 10: k = 100
K40 = {"loss.num_ddim_timesteps": 25, "eval_endpoint_timesteps": ()}   # a grid of 25: k = 40
DEMO = {**K100, "loss.ema_decay": 0.99}  # configs/shapes_lcd.py's recipe, TABLE_BASE undone
W13 = {"loss.w_min": 1.0, "loss.w_max": 3.0}  # guidance 2..4, sampled at 3: the teacher's best

# name: (description, overrides of configs/shapes_lcd.py on top of TABLE_BASE)
METHODS = {
    "lcd": ("LCD, epsilon student, k = 20, target EMA 0.995", {}),
    "lcd_x0": ("LCD, x0 student", {"loss.student_prediction": "x0"}),
    "lcd_v": ("LCD, v student", {"loss.student_prediction": "v"}),
    "guided_v": ("teacher guidance-distilled into a v student (not LCD)",
                 {"method": "guided", "loss.student_prediction": "v", "eval_endpoint_timesteps": ()}),
    "lcd_v_guided": ("LCD, v student from guided_v", {"loss.student_prediction": "v",
                                                      "model.student_init": "guided_v"}),
    "lcd_lr3e4": ("LCD, learning rate 3e-4 (the demo's 1e-4)", {"optim.learning_rate": 3e-4}),
    "lcd_sampler_t": ("LCD, t drawn toward the sampler's timesteps", {"loss.timestep_sampling": "sampler"}),
    "lcd_k40": ("LCD, skipping step k = 40 (N = 25)", K40),
    "lcd_k100": ("LCD, skipping step k = 100 (N = 10)", K100),
    "lcd_k100_ema95": ("LCD, k = 100 (N = 10), target EMA 0.95", {**K100, "loss.ema_decay": 0.95}),
    "lcd_k100_ema99": ("LCD, k = 100 (N = 10), target EMA 0.99 (the demo's recipe)",
                       DEMO),
    "lcd_k100_b16": ("LCD, k = 100 (N = 10), target EMA 0.99, batch 16",
                     {**DEMO, "batch_size": 16}),
    "lcd_k100_w5": ("LCD, k = 100 (N = 10), target EMA 0.99, w fixed at 5",
                    {**DEMO, "loss.w_min": 5.0, "loss.w_max": 5.0}),
    "lcd_k100_l2": ("LCD, k = 100 (N = 10), target EMA 0.99, L2 distance",
                    {**DEMO, "loss.loss_type": "l2"}),
    "lcd_k100_ema95_w13": ("LCD, k = 100 (N = 10), target EMA 0.95, w 1..3 (sampled at guidance 3)",
                           {**K100, **W13, "loss.ema_decay": 0.95}),
    "lcd_k40_ema95_w13": ("LCD, k = 40 (N = 25), target EMA 0.95, w 1..3 (sampled at guidance 3)",
                          {**K40, **W13, "loss.ema_decay": 0.95}),
    "lcd_k20_ema99_w13": ("LCD, k = 20 (N = 50), target EMA 0.99, w 1..3 (sampled at guidance 3)",
                          {**W13, "loss.ema_decay": 0.99}),
    "lcd_k200_ema99": ("LCD, k = 200 (N = 5), target EMA 0.99",
                       {"loss.num_ddim_timesteps": 5, "eval_endpoint_timesteps": (), "loss.ema_decay": 0.99}),
    "lcd_k100_k20": ("LCD, k = 20 from lcd_k100_ema99 (coarse to fine)",
                     {"model.student_init": "lcd_k100_ema99"}),
    "lcd_mixed_k": ("LCD, k = 20 and k = 100 hops half each, target EMA 0.99",
                    {"loss.coarse_ddim_timesteps": 10, "loss.ema_decay": 0.99}),
    "lora": ("LCM-LoRA, no target network (the paper's recipe)", {"method": "lcm_lora"}),
    "lora_ema": ("LCM-LoRA, EMA target", {"method": "lcm_lora", "loss.lora_target_ema": True}),
    "tcd": ("TCD (gamma 0.3 sampler)", {"method": "tcd"}),
    "pcm": ("PCM, 4 phases (4-step sampler at the phase edges)",
            {"method": "pcm", "loss.pcm_phases": 4, "eval_endpoint_timesteps": ()}),
}


def apply_overrides(config, overrides: dict) -> None:
    """Sets each dotted key of `overrides` ('loss.ema_decay') on `config`."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value


def method_config(name: str, steps: int, cache_dir: str, workdir: str = "", teacher: str = ""):
    """configs/shapes_lcd.py (with another `teacher` folder) with TABLE_BASE and METHODS[name]'s
    overrides, `steps` long, on the shared cache; a model.student_init names another method, whose
    run in `workdir` the student starts from."""
    from lcm_jax.worlds.shapes.demo import load_config

    overrides = METHODS[name][1]
    config = load_config("lora" if overrides.get("method") == "lcm_lora" else None, teacher)
    apply_overrides(config, {**TABLE_BASE, **overrides})
    if config.model.student_init:
        config.model.student_init = os.path.join(workdir, config.model.student_init)
    config.total_steps = steps
    config.checkpoint_every = min(config.checkpoint_every, steps)
    config.sample_every = 0
    config.eval_ema_decay = EVAL_EMA
    config.data.cache_dir = cache_dir
    return config


def sampler_runs(config) -> list[tuple[str, int, dict]]:
    """(sampler, steps, extra pipeline kwargs) a method is sampled with."""
    from lcm_jax import schedules

    if config.method == "pcm":  # deterministic, edge to edge: as many steps as phases
        ts = schedules.pcm_timesteps(1000, config.loss.num_ddim_timesteps, config.loss.pcm_phases)
        return [("tcd", len(ts), {"gamma": 0.0, "timesteps": [int(t) for t in ts]})]
    sampler, extra = ("tcd", {"gamma": 0.3}) if config.method == "tcd" else ("lcm", {})
    return [(sampler, n, extra) for n in SAMPLE_STEPS]


def with_starts(names: list[str]) -> list[str]:
    """`names` with each method a student starts from (model.student_init) run before it."""
    out: list[str] = []
    for name in names:
        start = METHODS[name][1].get("model.student_init")
        out += [n for n in ((start,) if start else ()) + (name,) if n not in out]
    return out


def diversity_prompts(n: int, per_prompt: int = 8) -> list[str]:
    """The first n held-out prompts that leave something out, each repeated `per_prompt` times."""
    from lcm_jax.worlds.shapes.evaluator import heldout_prompts

    full = heldout_prompts(4 * n, understated=0.0)[0]
    prompts = [p for p, f in zip(heldout_prompts(4 * n)[0], full) if p != f][:n]
    return [p for p in prompts for _ in range(per_prompt)]


def score(evaluator, pipe, prompts, div_prompts, sampler, steps, guidance, extra) -> dict:
    """FD / accuracy on `prompts` and diversity on `div_prompts` of one sampler setting."""
    from lcm_jax.evaluation.harness import generate

    t0 = time.time()
    m = evaluator(generate(pipe, prompts, sampler, steps, guidance, **extra), prompts)
    div = evaluator.diversity(generate(pipe, div_prompts, sampler, steps, guidance, seed=1000, **extra),
                              div_prompts)
    return {"sampler": sampler, "steps": steps, "guidance": guidance, "fd": m["fd"],
            "prompt_accuracy": m["prompt_accuracy"], "diversity": div, "seconds": round(time.time() - t0, 1)}


def baseline_rows(teacher, evaluator, prompts, div_prompts, lcm_guidance: float, grid: int,
                  oracle: bool) -> list[dict]:
    """The teacher's rows: 50 DDIM steps, DDIM / DPM-Solver++ and the undistilled student (LCM
    sampler, no CFG) at SAMPLE_STEPS, and with `oracle` the ideal LCM (50 teacher steps per
    sampler step: the costliest rows)."""
    from lcm_jax.evaluation.harness import oracle_generate

    runs = [("teacher, 50 DDIM steps", "ddim", 50, TEACHER_GUIDANCE)]
    runs += [(f"teacher, {s.upper() if s == 'ddim' else 'DPM-Solver++'}", s, n, TEACHER_GUIDANCE)
             for s in ("ddim", "dpm") for n in SAMPLE_STEPS]
    runs += [("not distilled (teacher under the LCM sampler)", "lcm", n, 1.0) for n in SAMPLE_STEPS]
    rows = [{"method": name, **score(evaluator, teacher, prompts, div_prompts, s, n, g, {})}
            for name, s, n, g in runs]
    for n in SAMPLE_STEPS if oracle else ():
        m = evaluator(oracle_generate(teacher, prompts, n, lcm_guidance, num_ddim_timesteps=grid), prompts)
        rows.append({"method": IDEAL, "sampler": "lcm", "steps": n,
                     "guidance": lcm_guidance, "fd": m["fd"], "prompt_accuracy": m["prompt_accuracy"]})
    return rows


def method_rows(name: str, workdir: str, steps: int, cache_dir: str, evaluator, prompts,
                div_prompts, teacher: str = "") -> list[dict]:
    """Trains (or resumes) one method and scores its target network and its evaluation EMA."""
    from lcm_jax import train
    from lcm_jax.runs import pipeline_from_training
    from lcm_jax.training.models import build_models
    from lcm_jax.training.state import sampling_guidance

    config = method_config(name, steps, cache_dir, workdir, teacher)
    t0 = time.time()
    state = train.train_and_evaluate(config, os.path.join(workdir, name))
    if int(state.step) < config.total_steps:  # stopped (SIGTERM): score nothing, the rerun resumes
        raise SystemExit(f"{name}: training stopped at step {int(state.step)} of {config.total_steps}; "
                         "nothing is scored; run the same command again to resume it")
    train_min = (time.time() - t0) / 60
    models, guidance, rows = build_models(config), sampling_guidance(config), []
    for weights in ("target", "eval EMA"):
        chosen = state if weights == "eval EMA" else state.replace(eval_params=None)
        pipe = pipeline_from_training(config, models, chosen)
        for sampler, n, extra in sampler_runs(config):
            rows.append({"method": METHODS[name][0], "name": name, "weights": weights,
                         "train_minutes": round(train_min, 1),
                         **score(evaluator, pipe, prompts, div_prompts, sampler, n, guidance, extra)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], num_prompts: int, steps: int) -> str:
    ref = next(r for r in rows if r["steps"] == 50)
    head = (f"# Methods on the shapes world ({num_prompts} held-out prompts, half under-stated; "
            f"{steps} training steps each)\n\nFD ratio: FD / the teacher's 50-step FD ({ref['fd']:.2f}); "
            f"accuracy ratio likewise ({ref['prompt_accuracy']:.3f}). Diversity: 1 is as varied as "
            "the world's images of a caption.\n\n"
            "| method | weights | sampler | steps | FD | FD ratio | prompt accuracy | accuracy ratio | diversity |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r['method']} | {r.get('weights', '')} | {r['sampler']} | {r['steps']} | {r['fd']:.2f} | "
             f"{r['fd'] / ref['fd']:.2f} | {r['prompt_accuracy']:.3f} | "
             f"{r['prompt_accuracy'] / ref['prompt_accuracy']:.2f} | "
             f"{r['diversity']:.2f} |" if "diversity" in r else
             f"| {r['method']} | | {r['sampler']} | {r['steps']} | {r['fd']:.2f} | {r['fd'] / ref['fd']:.2f} | "
             f"{r['prompt_accuracy']:.3f} | {r['prompt_accuracy'] / ref['prompt_accuracy']:.2f} | |"
             for r in rows]
    return head + "\n".join(lines) + "\n"


def report(rows: list[dict], num_prompts: int, steps: int) -> str:
    """WORKDIR/methods.md (docs/shapes_methods.md): the full table, the compact one, the aims."""
    return (markdown(rows, num_prompts, steps) + "\n" + compact_markdown(rows) + "\n"
            + "## The aims, for each method's target network (bold: met)\n\n" + aims_markdown(rows))


def aims_markdown(rows: list[dict]) -> str:
    """One line per aim (spread.aims: against the undistilled student, DDIM, DPM-Solver++ and the
    teacher's 50 steps), one column per method: its target network's ratio, bold where the aim is
    met; '-' where the method has no row at that step count (PCM samples at its phase edges only).
    A method's own sampler (TCD's, PCM's) stands in for the LCM sampler."""
    from lcm_jax.worlds.shapes import spread

    found = {}  # spread's keys: (model, sampler, steps)
    for r in rows:
        if "name" in r and r["weights"] == "target":
            found[(r["name"], "lcm", r["steps"])] = r
        elif "name" not in r and r["method"] != IDEAL:
            found[("teacher", r["sampler"], r["steps"])] = r

    def cell(a) -> str:
        if a.row not in found or a.reference not in found:
            return "-"
        ratio = found[a.row][a.metric] / found[a.reference][a.metric]
        return f"**{ratio:.3f}x**" if a.met(ratio) else f"{ratio:.3f}x"

    return spread.aims_table(list(dict.fromkeys(r["name"] for r in rows if "name" in r)), cell)


def compact_markdown(rows: list[dict]) -> str:
    """One line per (method, weights): FD, prompt accuracy and diversity at each step count."""
    groups: dict = {}
    for r in rows:
        if r["steps"] != 50:
            groups.setdefault((r["method"], r.get("weights", "")), {})[r["steps"]] = r
    steps = sorted({n for g in groups.values() for n in g})
    head = " / ".join(str(n) for n in steps)
    lines = [f"| method | weights | FD at {head} steps | prompt accuracy | diversity |", "|---|---|---|---|---|"]
    for (method, weights), g in groups.items():
        cell = lambda key, fmt: " / ".join(fmt.format(g[n][key]) if n in g and key in g[n] else "-" for n in steps)
        lines.append(f"| {method} | {weights} | {cell('fd', '{:.1f}')} | {cell('prompt_accuracy', '{:.3f}')} | "
                     f"{cell('diversity', '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """FD against sampling steps, one line per (method, weights): a colour per method, its eval EMA
    dashed; the teacher's 50 steps a black dashed line. The legend sits beside the axes, the figure
    tall enough for all of it."""
    from lcm_jax.evaluation.report import _pyplot, _save

    plt = _pyplot()
    ref = next(r for r in rows if r["steps"] == 50)
    groups: dict = {}
    for r in rows:
        if r is not ref:
            groups.setdefault((r["method"], r.get("weights", "")), []).append(r)
    fig, ax = plt.subplots(figsize=(13, max(5.5, 0.17 * (len(groups) + 2))))  # room for the legend
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(dict.fromkeys(m for m, _ in groups))}
    for (method, weights), g in groups.items():
        g = sorted(g, key=lambda r: r["steps"])
        ax.plot([r["steps"] for r in g], [r["fd"] for r in g], "o--" if weights == "eval EMA" else "o-",
                color=colours[method], label=f"{method} {weights}".strip())
    ax.axhline(ref["fd"], ls="--", c="k", label="teacher, 50 DDIM steps")
    ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="FD (log scale)")
    ax.set_xticks(SAMPLE_STEPS, [str(n) for n in SAMPLE_STEPS])
    ax.minorticks_off()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(plt, fig, path)


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/methods")
    p.add_argument("--steps", type=int, default=1200, help="training steps of every method")
    p.add_argument("--num_prompts", type=int, default=500)
    p.add_argument("--diversity_prompts", type=int, default=25)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--teacher", default="", help="default: the shipped shapes teacher (the "
                   "workdir's latent cache refuses another)")
    p.add_argument("--oracle", action="store_true", help="also score the ideal LCM (slow)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="score the teacher's rows (--no-baselines: another process of the same "
                        "table does)")
    a = p.parse_args(argv)
    names = [n for n in a.methods.split(",") if n]  # --methods "": the baselines alone
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")

    from absl import logging

    from lcm_jax.pipeline import LCMPipeline
    from lcm_jax.training import latent_cache
    from lcm_jax.training.state import sampling_guidance
    from lcm_jax.worlds.shapes.evaluator import ShapesEvaluator, heldout_prompts

    logging.set_verbosity(logging.WARNING)
    cache = os.path.join(a.workdir, "latents")
    base = method_config("lcd", a.steps, cache, teacher=a.teacher)  # refuses a bad --teacher first
    os.makedirs(a.workdir, exist_ok=True)
    jsonl = os.path.join(a.workdir, "methods.jsonl")
    rows = read_rows(jsonl)
    latent_cache.build(base, cache)
    evaluator, prompts = ShapesEvaluator(), heldout_prompts(a.num_prompts)[0]
    div_prompts = diversity_prompts(a.diversity_prompts)
    todo = [None] if a.baselines and not any("weights" not in r for r in rows) else []
    todo += [n for n in with_starts(names) if not any(r.get("name") == n for r in rows)]
    for i, name in enumerate(todo):
        t0 = time.time()
        print(f"[{i + 1}/{len(todo)}] {name or 'baselines'}", flush=True)
        new = (baseline_rows(LCMPipeline.from_pretrained(base.model.teacher), evaluator, prompts, div_prompts,
                             sampling_guidance(base), base.loss.num_ddim_timesteps, a.oracle) if name is None else
               method_rows(name, a.workdir, a.steps, cache, evaluator, prompts, div_prompts, a.teacher))
        with open(jsonl, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
        rows += new
        print(f"  done in {(time.time() - t0) / 60:.1f} min", flush=True)
    rows = [r for r in rows if "weights" not in r] + [r for n in with_starts(names) for r in rows if r.get("name") == n]
    if not any(r["steps"] == 50 for r in rows):
        return   # the report needs the teacher's 50 steps
    with open(os.path.join(a.workdir, "methods.md"), "w") as f:
        f.write(report(rows, a.num_prompts, a.steps))
    plot(rows, os.path.join(a.workdir, "methods.png"))
    print(markdown(rows, a.num_prompts, a.steps))


if __name__ == "__main__":
    main()
