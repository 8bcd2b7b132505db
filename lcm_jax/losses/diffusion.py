"""Denoising diffusion loss (Ho et al. 2020), to train or fine-tune a teacher.

L = E_{t, eps} || F(z_t, c, t) - y ||^2 with z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps and the
regression target y = eps ('epsilon'), v = sqrt(abar_t) eps - sqrt(1 - abar_t) z ('v_prediction',
Salimans & Ho 2022) or z ('sample').
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from lcm_jax import schedules

Params = Any


def diffusion_target(z: jax.Array, eps: jax.Array, abar_t: jax.Array, prediction_type: str) -> jax.Array:
    """The regression target y for the schedule's prediction type (abar_t broadcastable to z)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return jnp.sqrt(abar_t) * eps - jnp.sqrt(1.0 - abar_t) * z
    if prediction_type == "sample":
        return z
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")


def make_diffusion_loss(model_fn: Callable[..., jax.Array], schedule: schedules.NoiseSchedule):
    """Builds loss_fn(params, target_params, frozen, batch, rng) -> (loss, per_example_loss).

    Same signature as the consistency losses so one trainer runs both; `target_params` is unused.
    Caption dropout for classifier-free guidance is applied by the caller on `prompt_embeds`.
    """
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

    def loss_fn(params, target_params, frozen, batch, rng):
        del target_params
        z, text = batch["latents"], batch["prompt_embeds"]
        rng_t, rng_eps = jax.random.split(rng)
        t = jax.random.randint(rng_t, (z.shape[0],), 0, schedule.num_train_timesteps)
        eps = jax.random.normal(rng_eps, z.shape, jnp.float32)
        a = abar[t][:, None, None, None]
        z_t = jnp.sqrt(a) * z + jnp.sqrt(1.0 - a) * eps
        out = model_fn(params, frozen, z_t, t, text, None, batch.get("added_cond"))
        y = diffusion_target(z, eps, a, schedule.prediction_type)
        per_example = jnp.mean(jnp.square(out.astype(jnp.float32) - y), axis=(1, 2, 3))
        return jnp.mean(per_example), per_example

    return loss_fn
