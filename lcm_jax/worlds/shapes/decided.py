"""How much of a sample a teacher has decided at each timestep: its one-step x0-prediction from
real held-out images noised to t, scored like samples (FD, prompt accuracy).

    python -m lcm_jax.worlds.shapes.decided [--teacher FOLDER] [--num_prompts 500]
        [--timesteps 999,759,499,259] [--guidance 1] [--out FILE.md]

A few-step sampler without distillation ends on the teacher's x0-prediction at its last timestep
(the 4-step LCM sampler's are 999, 759, 499, 259). Where that prediction from the true noised
image already scores like the teacher's own 50 DDIM steps, the world is decided there and
distillation has little left to add at that step count; where it is a blend (FD far above the
teacher's), a sampler needs the teacher's ODE, which is what LCD distils. Guidance 1 is the
undistilled student's (its w-embedding starts at zero).
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np

from lcm_jax.worlds.shapes import TEACHER_DIR


def x0_images(pipe, images: np.ndarray, prompts: Sequence[str], t: int, guidance: float,
              batch: int = 100) -> np.ndarray:
    """The teacher's one-step x0-prediction (decoded) from `images` noised to timestep `t`: one
    LCM step of img2img at timesteps [t] (the boundary condition is the identity on x0 for
    t > 0 up to c_skip(t) < 1e-6 at t >= 259); batch i draws its noise from seed i."""
    out = [pipe.img2img(list(prompts[s:s + batch]), images[s:s + batch], strength=1.0,
                        timesteps=[t], num_inference_steps=1, sampler="lcm",
                        guidance_scale=guidance, seed=i, compile="model")
           for i, s in enumerate(range(0, len(prompts), batch))]
    return np.concatenate(out)


def heldout_images(n: int) -> tuple[np.ndarray, list[str], dict]:
    """The first n held-out prompts (`evaluator.heldout_prompts`) with their real images."""
    from lcm_jax.worlds.shapes import world as shapes

    return shapes.ShapesWorld(shapes.EVAL_SEED, shapes.UNDERSTATED).batch(range(n))


def decided_rows(pipe, evaluator, images: np.ndarray, prompts: Sequence[str],
                 timesteps: Sequence[int], guidance: float) -> list[dict]:
    """One row per timestep (and one for the real images themselves, t = 0): FD and accuracy."""
    rows = [{"t": 0, **_scores(evaluator, images, prompts)}]
    for t in timesteps:
        rows.append({"t": int(t), **_scores(evaluator, x0_images(pipe, images, prompts, t, guidance),
                                            prompts)})
        print(f"t = {t}: FD {rows[-1]['fd']:.1f}, accuracy {rows[-1]['prompt_accuracy']:.3f}", flush=True)
    return rows


def _scores(evaluator, images, prompts) -> dict:
    r = evaluator(images, prompts)
    return {"fd": float(r["fd"]), "prompt_accuracy": float(r["prompt_accuracy"])}


def markdown(rows: Sequence[dict], teacher: str, guidance: float, num_prompts: int) -> str:
    lines = [f"The teacher's one-step x0-prediction from real held-out images noised to t "
             f"({teacher}, guidance {guidance:g}, {num_prompts} prompts); t = 0: the real images.\n",
             "| t | FD | prompt accuracy |", "|---:|---:|---:|"]
    lines += [f"| {r['t']} | {r['fd']:.1f} | {r['prompt_accuracy']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from lcm_jax.pipeline import LCMPipeline
    from lcm_jax.worlds.shapes.evaluator import ShapesEvaluator

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=TEACHER_DIR)
    p.add_argument("--num_prompts", type=int, default=500)
    p.add_argument("--timesteps", default="999,759,499,259")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    a = p.parse_args(argv)
    if not os.path.exists(os.path.join(a.teacher, "model_index.json")):
        raise SystemExit(f"no teacher pipeline at {a.teacher}: pass --teacher FOLDER")
    timesteps = [int(t) for t in a.timesteps.split(",") if t.strip().isdigit()]
    if len(timesteps) != len(a.timesteps.split(",")) or not all(0 < t < 1000 for t in timesteps):
        raise SystemExit(f"--timesteps {a.timesteps}: give integers in 1..999, comma-separated")
    images, prompts, _ = heldout_images(a.num_prompts)
    rows = decided_rows(LCMPipeline.from_pretrained(a.teacher), ShapesEvaluator(), images, prompts,
                        timesteps, a.guidance)
    text = markdown(rows, a.teacher, a.guidance, a.num_prompts)
    print(text)
    if a.out:
        from lcm_jax import fs
        fs.write_text_atomic(a.out, text)


if __name__ == "__main__":
    main()
