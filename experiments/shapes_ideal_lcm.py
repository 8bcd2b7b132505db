"""The ceiling of LCD on a shapes teacher at other guidances and grids than the methods table's
(`methods --oracle` scores the demo's: guidance 6, N = 50): on the table's held-out prompts and
starting noise, the teacher's 50 DDIM steps at each guidance and the ideal LCM (the teacher's own
CFG DDIM chain on a grid of N as the consistency function; evaluation.harness.oracle_generate) at
each (steps, N). One JSON line per row on stdout.

    python experiments/shapes_ideal_lcm.py --teacher FOLDER --guidance 3 --runs 4:10,4:50,1:10

A step from t costs up to N teacher passes with CFG: --runs 4:50 on 500 prompts is about 12
minutes on 2 CPU cores beside two other jobs.
"""
import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a shapes teacher pipeline folder")
    p.add_argument("--guidance", default="3", help="comma-separated guidance scales (w + 1)")
    p.add_argument("--runs", default="4:10,4:50", help="comma-separated STEPS:N (LCM steps, grid)")
    p.add_argument("--num_prompts", type=int, default=500)
    a = p.parse_args()
    from lcm_jax.evaluation.harness import generate, oracle_generate
    from lcm_jax.pipeline import LCMPipeline
    from lcm_jax.worlds.shapes.evaluator import ShapesEvaluator, heldout_prompts

    pipe, evaluator = LCMPipeline.from_pretrained(a.teacher), ShapesEvaluator()
    prompts = heldout_prompts(a.num_prompts)[0]
    runs = [tuple(int(x) for x in r.split(":")) for r in a.runs.split(",")]
    for g in (float(x) for x in a.guidance.split(",")):
        rows = [("teacher, 50 DDIM steps", 50, None)] + [("ideal LCM", n, grid) for n, grid in runs]
        for name, steps, grid in rows:
            t0 = time.time()
            images = (generate(pipe, prompts, "ddim", 50, g) if grid is None else
                      oracle_generate(pipe, prompts, steps, g, num_ddim_timesteps=grid))
            m = evaluator(images, prompts)
            print(json.dumps({"method": name, "guidance": g, "steps": steps, "grid": grid, "fd": m["fd"],
                              "prompt_accuracy": m["prompt_accuracy"],
                              "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
