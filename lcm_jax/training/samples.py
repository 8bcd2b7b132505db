"""Sample grids during training: the config's sample prompts at 1, 2 and 4 steps of the method's
sampler (LCM; TCD's for 'tcd'; for 'pcm' the deterministic phase-edge steps) from the network that
samples (`sampling_params`; LoRA merged into the teacher), written to samples/.
Every process takes part in the sharded computation (the weights are sharded over all hosts);
process 0 writes the image.

Built on the losses' view of the student (`make_model_fns`), the frozen encoders (`make_encode`)
and the samplers; the pipeline is not involved, so training never depends on it.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lcm_jax import fs, sampling, schedules, sharding
from lcm_jax.components import decode_latents
from lcm_jax.evaluation.grids import save_grid
from lcm_jax.models.layers import guidance_scale_embedding
from lcm_jax.training.models import Models, make_model_fns, student_schedule, tokenize_fn, uses_w_embedding
from lcm_jax.training.state import TrainState, sampling_params, w_midpoint
from lcm_jax.training.step import make_encode

GRID_STEPS = (1, 2, 4)
GRID_SEED = 0
TCD_GAMMA = 0.3  # the TCD sampler's default (diffusers' TCDScheduler eta)


def grid_samplers(config, num_train_timesteps: int) -> dict[int, tuple[str, np.ndarray, float]]:
    """{steps: (sampler, timesteps, gamma)} of the rows of a run's sample grid: LCM at GRID_STEPS
    on the distilled grid; TCD for method 'tcd'; for 'pcm' one row, the TCD sampler at gamma = 0
    on the phase edges (an edge-to-edge DDIM step each, PCM's deterministic sampling)."""
    n = config.loss.num_ddim_timesteps
    if config.method == "pcm":
        ts = schedules.pcm_timesteps(num_train_timesteps, n, config.loss.pcm_phases)
        return {len(ts): ("tcd", ts, 0.0)}
    if config.method == "tcd":
        return {m: ("tcd", schedules.tcd_timesteps(m, config_original_inference_steps=n,
                                                   num_train_timesteps=num_train_timesteps), TCD_GAMMA)
                for m in GRID_STEPS}
    return {m: ("lcm", schedules.lcm_timesteps(m, n, num_train_timesteps), 0.0) for m in GRID_STEPS}


def make_sampler(config, models: Models) -> Callable:
    """sample(params, frozen, latents, text, added, rng, num_steps) -> images in [0, 1]: the run's
    own sampler for `num_steps` (`grid_samplers`) on the student, guided through its w-embedding
    at the middle of the distilled range, then the VAE decode. The sample grids and the planner
    (`planning.plan_sampler`) both compile this."""
    student_fn, _ = make_model_fns(config, models)
    grids = grid_samplers(config, models.schedule.num_train_timesteps)
    schedule = student_schedule(config, models.schedule)
    w_emb1 = None  # one row, a constant of the compiled program
    if uses_w_embedding(config):
        w_emb1 = guidance_scale_embedding(jnp.full((1,), w_midpoint(config)), config.model.time_cond_proj_dim)

    def sample(params, frozen, latents, text, added, rng, num_steps: int):
        w_emb = None if w_emb1 is None else jnp.broadcast_to(w_emb1, (latents.shape[0], w_emb1.shape[1]))
        model_fn = lambda x, t: student_fn(params, frozen, x, t, text, w_emb, added)
        name, ts, gamma = grids[num_steps]
        z = sampling.sample(name, model_fn, latents, schedule, ts, rng, gamma=gamma)
        return decode_latents(models.vae, frozen["vae"], z)

    return sample


def make_sample_grid(config, models: Models, frozen: dict, workdir: str,
                     mesh: Mesh) -> Optional[Callable[[TrainState, int], str]]:
    """grid(state, step) -> path of samples/step_XXXXXX.png, called on every process; None when
    the run samples nothing (sample_every 0, no VAE or tokenizer, or teacher training)."""
    if not config.sample_every or models.vae is None or config.method == "diffusion":
        return None
    prompts = list(config.sample_prompts)
    ids = tokenize_fn(models)(prompts)
    encode = make_encode(config, models, with_uncond=False)
    f = models.vae.downsample_factor
    size = config.data.resolution
    shape = (len(prompts), size // f, size // f, models.unet.config.in_channels)
    grids = grid_samplers(config, models.schedule.num_train_timesteps)
    sample = make_sampler(config, models)

    @functools.partial(jax.jit, static_argnums=3, out_shardings=sharding.replicated(mesh))
    def images(params, frozen, rng, num_steps: int):
        rng_lat, rng_steps = jax.random.split(rng)
        latents = jax.random.normal(rng_lat, shape, jnp.float32)
        cond = encode(frozen, {"latents": latents, "input_ids": jnp.asarray(ids)}, rng_lat)
        return sample(params, frozen, latents, cond["prompt_embeds"], cond.get("added_cond"), rng_steps, num_steps)

    def grid(state: TrainState, step: int) -> str:
        params, rng = sampling_params(state), jax.random.PRNGKey(GRID_SEED)
        rows = [jax.device_get(images(params, frozen, rng, n)) for n in grids]
        path = fs.join(workdir, "samples", f"step_{step:06d}.png")
        if jax.process_index() == 0:
            save_grid(jnp.concatenate(rows), path, nrow=len(prompts),
                      labels=[f"{n} step{'s' if n > 1 else ''}" for n in grids])
        return path

    return grid
