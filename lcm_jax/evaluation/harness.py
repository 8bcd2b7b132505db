"""The sampling harness: images from a pipeline's public methods at fixed seeds, scored by an
evaluator, as rows of the steps-vs-quality table (the LCM paper's Table 1 at any scale).

An evaluator is any callable `evaluator(images, prompts) -> {"fd": ..., "prompt_accuracy": ...}`
(a world supplies one, e.g. `lcm_jax.worlds.shapes.evaluator.ShapesEvaluator`); the harness knows
nothing of what the images show.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Evaluator(Protocol):
    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> Mapping[str, float]: ...


@dataclasses.dataclass
class QualityRow:
    model: str           # 'teacher', 'LCM', 'LCM-LoRA'
    sampler: str         # 'ddim', 'dpm', 'lcm'
    steps: int
    guidance: float
    fd: float
    prompt_accuracy: float
    seconds: float       # wall time to sample every prompt (after the first compile)


def _padded_chunks(prompts: Sequence[str], batch: int):
    """(i, chunk) of `batch` prompts each, the last padded with its last prompt (one shape per
    compile); chunk i samples from seed + i."""
    for i, s in enumerate(range(0, len(prompts), batch)):
        chunk = list(prompts[s:s + batch])
        yield i, chunk + [chunk[-1]] * (batch - len(chunk))


def generate(pipe, prompts: Sequence[str], sampler: str, steps: int, guidance: float,
             seed: int = 0, batch: int = 100, size: int = 64, **kwargs) -> np.ndarray:
    """Images for `prompts` in fixed-size batches; batch i draws its latents from seed + i, so
    every sampler sees the same starting noise. Only the UNet and VAE calls are compiled
    (compile='model'), once for every sampler and step count. `kwargs` go to the pipeline
    (e.g. gamma, timesteps)."""
    out = []
    for i, chunk in _padded_chunks(prompts, batch):
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=size,
                        width=size, seed=seed + i, sampler=sampler, compile="model", **kwargs))
    return np.concatenate(out)[:len(prompts)]


def oracle_generate(pipe, prompts: Sequence[str], steps: int, guidance: float, seed: int = 0,
                    batch: int = 100, size: int = 64,
                    num_ddim_timesteps: Optional[int] = None) -> np.ndarray:
    """What a perfectly distilled LCM of `pipe`'s teacher would sample: generate(pipe, prompts,
    'lcm', ...) with the same starting noise and re-noising draws, the consistency function
    replaced by the value LCD converges to, the teacher's own CFG DDIM chain on the skipping
    grid of N = `num_ddim_timesteps` (the run's config.loss.num_ddim_timesteps; None: the
    scheduler config's original_inference_steps, else 50) from each sampling timestep to t = 0
    (consistency.teacher_chain_endpoint, guidance scale `guidance` = w + 1). The ceiling of
    distillation at this guidance, to tell a student that has not learned the ODE from a
    sampler that cannot use it. A step from t costs up to N teacher CFG passes. SD 1.x/2.x-style
    pipelines (no pooled text embeddings)."""
    from lcm_jax import sampling, schedules
    from lcm_jax.losses import consistency

    if pipe.components.unet.config.time_cond_proj_dim is not None:
        raise ValueError("oracle_generate needs the teacher's pipeline (a UNet without a w-embedding), "
                         "not a distilled LCM's")
    schedule = pipe.components.schedule
    num_ddim = int(num_ddim_timesteps or pipe.components.scheduler_config.get("original_inference_steps", 50))
    ts = [int(t) for t in pipe.timesteps("lcm", steps, original_inference_steps=num_ddim)]
    params, _ = pipe.unet_call_params()
    teacher_fn = lambda _, frozen, x, t, text, w_emb, added: pipe.apply_unet(frozen, x, t, text, None, added)
    chains = {t: jax.jit(lambda frozen, cond, z, t=t: consistency.teacher_chain_endpoint(
        teacher_fn, frozen, cond, z, t, guidance - 1.0, schedule, num_ddim)) for t in ts}
    out = []
    for i, chunk in _padded_chunks(prompts, batch):
        text, pooled = pipe.encode_prompt(chunk)
        if pooled is not None:
            raise ValueError("oracle_generate supports pipelines without pooled text embeddings (not SDXL)")
        cond = {"prompt_embeds": text, "uncond_embeds": pipe.encode_negative_prompt(None, text, None)[0]}
        rng_lat, rng_steps = jax.random.split(jax.random.PRNGKey(seed + i))  # as pipe(..., seed)
        latents = jax.random.normal(rng_lat, pipe.latent_shape(batch, size, size))

        def model_fn(x, t):  # the model output whose x0-prediction at t is the chain's endpoint
            t0 = int(t[0])
            x0 = chains[t0](params, cond, x)
            a = jnp.float32(schedule.alpha_bar(np.asarray(t0)))
            return schedules.output_for_x0(x0, x, a, schedule.prediction_type)

        z = sampling.lcm_sample(model_fn, latents, schedule, np.asarray(ts), rng_steps, debug=True)
        out.append(np.asarray(pipe.decode(z)))
    return np.concatenate(out)[:len(prompts)]


def steps_quality_table(runs: Sequence[tuple], evaluator: Evaluator, prompts: Sequence[str],
                        seed: int = 0, batch: int = 100, log=print) -> list[QualityRow]:
    """One row per (name, pipe, sampler, steps, guidance) in `runs`: FD and prompt accuracy."""
    rows, warm = [], set()
    for name, pipe, sampler, steps, guidance in runs:
        # Warm up once per pipe and guidance (CFG doubles the UNet's batch): compiles its UNet and
        # VAE, shared by every sampler and step count, so `seconds` is sampling alone.
        if (id(pipe), guidance) not in warm:
            warm.add((id(pipe), guidance))
            generate(pipe, prompts[:batch], sampler, 1, guidance, seed, batch)
        t0 = time.perf_counter()
        images = generate(pipe, prompts, sampler, steps, guidance, seed, batch)
        seconds = time.perf_counter() - t0
        m = evaluator(images, prompts)
        rows.append(QualityRow(name, sampler, steps, guidance, m["fd"], m["prompt_accuracy"], seconds))
        log(f"  {name:9s} {sampler:5s} {steps:3d} steps  FD {m['fd']:8.2f}  "
            f"prompt acc {m['prompt_accuracy']:.3f}  ({seconds:.1f}s)")
    return rows


def one_step_distances(pipes: Sequence[tuple[Any, float]], reference, prompts: Sequence[str],
                       reference_guidance: float, seed: int = 0, batch: int = 100,
                       size: int = 64) -> list[float]:
    """For each (pipe, guidance): the RMS pixel distance (images in [0, 1]) between its one-step
    LCM images and `reference`'s 50-step DDIM images from the same starting noise (`generate`
    seeds batch i with seed + i for every sampler), i.e. how far a consistency model is from the
    endpoint of the teacher's probability-flow ODE, the map LCD distills."""
    ref = generate(reference, prompts, "ddim", 50, reference_guidance, seed, batch, size)
    return [float(np.sqrt(np.mean(np.square(
        generate(pipe, prompts, "lcm", 1, guidance, seed, batch, size) - ref))))
        for pipe, guidance in pipes]


def quality_runs(teacher, lcm, lora, lcm_guidance: float, teacher_guidance: float,
                 steps: Sequence[int] = (1, 2, 4, 8)) -> list[tuple]:
    """The table's (name, pipe, sampler, steps, guidance) rows: the teacher's 50 DDIM steps as the
    reference, DDIM / DPM-Solver++ and the LCM at `steps`, the undistilled teacher under the LCM
    sampler (the ablation), and LCM-LoRA at 4 steps when `lora` is given."""
    runs = [("teacher", teacher, "ddim", 50, teacher_guidance)]
    runs += [("teacher", teacher, s, n, teacher_guidance) for s in ("ddim", "dpm") for n in steps]
    runs += [("LCM", lcm, "lcm", n, lcm_guidance) for n in steps]
    # Ablation: the undistilled teacher under the LCM sampler (x0-prediction, then fresh noise),
    # without CFG, i.e. the student before its first LCD step. What distillation adds is the gap
    # between this row and the LCM row.
    runs += [("teacher", teacher, "lcm", n, 1.0) for n in steps]
    if lora is not None:
        runs.append(("LCM-LoRA", lora, "lcm", 4, 1.0))
    return runs
