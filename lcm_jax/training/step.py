"""The update step and the evaluation functions of a run: encode the raw batch with the frozen VAE /
text encoder(s), the loss of the method, gradients (accumulated over micro-batches), AdamW, the
EMA; the fixed-batch eval loss and the endpoint error."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from lcm_jax.components import sdxl_text_embeddings, sdxl_time_ids
from lcm_jax.losses import consistency, diffusion
from lcm_jax.models import accounting
from lcm_jax.training.models import Models, make_model_fns, student_prediction, uses_w_embedding
from lcm_jax.training.state import (TrainState, ema_decay, eval_ema_decay, loss_target, sampling_params,
                                    w_midpoint)

EVAL_SEED_OFFSET = 1       # the eval loss's fixed key: PRNGKey(config.seed + 1)
ENDPOINT_SEED_OFFSET = 3   # the endpoint error's fixed key


def consistency_config(config) -> consistency.ConsistencyConfig:
    """The consistency loss's options from a run's config (LCD, LCM-LoRA, LCF, TCD, PCM)."""
    lc = config.loss
    return consistency.ConsistencyConfig(
        num_ddim_timesteps=lc.num_ddim_timesteps, w_min=lc.w_min, w_max=lc.w_max,
        w_embed_dim=config.model.time_cond_proj_dim if uses_w_embedding(config) else None,
        loss_type=lc.loss_type, huber_c=lc.huber_c, sigma_data=lc.sigma_data,
        timestep_scaling=lc.timestep_scaling, solver="data" if config.method == "lcf" else lc.solver,
        timestep_weighting=lc.timestep_weighting,
        method=config.method if config.method in consistency.METHODS else "lcd",
        student_prediction=student_prediction(config), timestep_sampling=lc.timestep_sampling,
        pcm_phases=lc.pcm_phases, coarse_ddim_timesteps=lc.coarse_ddim_timesteps,
        coarse_fraction=lc.coarse_fraction)


def make_loss(config, models: Models):
    student_fn, teacher_fn = make_model_fns(config, models)
    if config.method == "diffusion":
        return diffusion.make_diffusion_loss(student_fn, models.schedule)
    lc = config.loss
    cfg = consistency_config(config)
    if config.method == "guided":
        return consistency.make_guidance_loss(student_fn, teacher_fn, models.schedule, cfg)
    if config.method == "lcf":
        cfg = dataclasses.replace(cfg, w_min=lc.lcf_w, w_max=lc.lcf_w)
    return consistency.make_consistency_loss(student_fn, teacher_fn, models.schedule, cfg)


def make_encode(config, models: Models, with_uncond: bool = True) -> Callable:
    """Raw batch -> latents and text embeddings (inside the jitted step, frozen VAE/text encoder);
    with_uncond=False stops there (the latent cache), else adds the unconditional embeddings."""
    def encode(frozen, batch, rng):
        out = dict(batch)
        if "pixel_values" in out:
            post = models.vae.apply({"params": frozen["vae"]}, out.pop("pixel_values"), method="encode")
            z = post.sample(rng)
            shift = models.vae.shift_factor or 0.0
            out["latents"] = ((z - shift) * models.vae.scaling_factor).astype(jnp.float32)
        b = out["latents"].shape[0]
        micro = (out.pop("original_size", None), out.pop("crop_top_left", None))  # SDXL only
        if "input_ids" in out and models.text_encoder_2 is not None:  # SDXL, ids (B, 2, L)
            out.update(_encode_sdxl(config, models, frozen, out.pop("input_ids"), *micro))
        elif "input_ids" in out:
            te = models.text_encoder.apply({"params": frozen["text_encoder"]}, out.pop("input_ids"))
            out["prompt_embeds"] = te.last_hidden_state.astype(jnp.float32)
        if not with_uncond:
            return out
        uncond = jnp.broadcast_to(frozen["uncond_embeds"], (b,) + frozen["uncond_embeds"].shape[1:])
        out["uncond_embeds"] = uncond
        if config.data.caption_dropout > 0:  # every method (diffusers' proportion_empty_prompts)
            drop = jax.random.bernoulli(jax.random.fold_in(rng, 1), config.data.caption_dropout, (b,))
            out["prompt_embeds"] = jnp.where(drop[:, None, None], uncond, out["prompt_embeds"])
        return out
    return encode


def _encode_sdxl(config, models: Models, frozen, ids: jax.Array, original_size=None,
                 crop_top_left=None) -> dict:
    """SDXL conditioning: concatenated penultimate states, pooled embeds and micro-conditioning
    time_ids (original size, crop top-left, target size): the source's own per-example values
    when it gives them, else (resolution, resolution, 0, 0, resolution, resolution); zero pooled
    embeds for uncond."""
    embeds, pooled = sdxl_text_embeddings(models.text_encoder, frozen["text_encoder"],
                                          models.text_encoder_2, frozen["text_encoder_2"],
                                          ids[:, 0], ids[:, 1])
    r = config.data.resolution
    time_ids = jnp.asarray(sdxl_time_ids(ids.shape[0], r, r))
    if original_size is not None and crop_top_left is not None:
        time_ids = jnp.concatenate([jnp.asarray(original_size, jnp.float32),
                                    jnp.asarray(crop_top_left, jnp.float32), time_ids[:, 4:]], axis=1)
    pooled = pooled.astype(jnp.float32)
    return {"prompt_embeds": embeds.astype(jnp.float32),
            "added_cond": {"text_embeds": pooled, "time_ids": time_ids},
            "uncond_added_cond": {"text_embeds": jnp.zeros_like(pooled), "time_ids": time_ids}}


def make_train_step(config, models: Models, tx: optax.GradientTransformation, lr_fn) -> Callable:
    """train_step(state, frozen, batch) -> (state, metrics); pure, one XLA program.

    The step's randomness is fold_in(state.rng, state.step), so a resumed run draws exactly what
    the uninterrupted one would. `frozen` is an argument (not a closure) to stay a sharded input.
    """
    loss_fn = make_loss(config, models)
    encode = make_encode(config, models)
    accum = config.optim.grad_accum_steps
    decay, slow_decay = ema_decay(config), eval_ema_decay(config)

    def grads_of(params, target, frozen, batch, rng):
        target = loss_target(config, params, target)
        def f(p):
            loss, _ = loss_fn(p, target, frozen, batch, rng)
            return loss
        return jax.value_and_grad(f)(params)

    def train_step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        rng_enc, rng_loss = jax.random.split(rng)
        batch = encode(frozen, batch, rng_enc)
        if accum == 1:
            loss, grads = grads_of(state.params, state.target_params, frozen, batch, rng_loss)
        else:  # gradient accumulation over `accum` micro-batches, summed in a scan
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, xs):
                i, mb = xs
                l, g = grads_of(state.params, state.target_params, frozen, mb, jax.random.fold_in(rng_loss, i))
                return jax.tree.map(jnp.add, carry, (l, g)), None

            zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accum), micro),
                                            unroll=accounting.on())  # cost analysis counts one body
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        target = state.target_params
        if decay > 0:
            target = consistency.ema_update(target, params, decay)
        slow = state.eval_params
        if slow_decay > 0:
            slow = consistency.ema_update(slow, params, slow_decay)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step),
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
        new = state.replace(step=state.step + 1, params=params, target_params=target, opt_state=opt_state,
                            eval_params=slow)
        return new, metrics

    return train_step


def make_eval_loss(config, models: Models) -> Callable:
    """eval_loss(state, frozen, batch) -> the loss with a fixed key on a fixed batch.

    The training loss is drawn at a new (n, eps, w) every step, so its curve is dominated by
    that draw; the same draw every time gives a low-variance curve that shows learning.
    """
    loss_fn = make_loss(config, models)
    encode = make_encode(config, models)
    key = jax.random.PRNGKey(config.seed + EVAL_SEED_OFFSET)

    def eval_loss(state: TrainState, frozen, batch):
        target = loss_target(config, state.params, state.target_params)
        return loss_fn(state.params, target, frozen, encode(frozen, batch, key), key)[0]

    return eval_loss


def make_eval_endpoint(config, models: Models) -> Optional[Callable]:
    """eval_endpoint(state, frozen, batch) -> (S,) one-step MSE to the teacher's ODE endpoint from
    each of config.eval_endpoint_timesteps (consistency.make_endpoint_error), for the network
    that samples (`sampling_params`), at the middle of the
    training guidance range and a fixed key. None when off or when there is no teacher."""
    starts = tuple(int(t) for t in config.get("eval_endpoint_timesteps", ()) or ())
    if not starts or config.method not in ("lcd", "lcm_lora", "tcd"):
        return None
    student_fn, teacher_fn = make_model_fns(config, models)
    error = consistency.make_endpoint_error(student_fn, teacher_fn, models.schedule,
                                            consistency_config(config), starts)
    encode = make_encode(config, models)
    key = jax.random.PRNGKey(config.seed + ENDPOINT_SEED_OFFSET)
    w = w_midpoint(config)
    n = int(config.get("eval_endpoint_batch", 16))

    def eval_endpoint(state: TrainState, frozen, batch):
        params = sampling_params(state)
        batch = jax.tree.map(lambda x: x[:n], batch)  # the chain costs a sampler run per example
        return error(params, frozen, encode(frozen, batch, key), w, key)

    return eval_endpoint


def endpoint_row(config, errors) -> dict:
    """{'endpoint_mse/t999': ..., ...}: the metrics names of make_eval_endpoint's output."""
    return {f"endpoint_mse/t{int(t)}": float(e)
            for t, e in zip(config.eval_endpoint_timesteps, jax.device_get(errors))}
