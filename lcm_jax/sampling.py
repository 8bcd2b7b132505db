"""Stateless samplers: LCM multistep, TCD(gamma), DDIM and DPM-Solver++(2M), plus CFG.

Each sampler computes its timesteps' coefficients up front in numpy (float32, in the order the
diffusers schedulers compute them, so both agree step for step), then runs the steps with
`lax.scan`: under `jax.jit` the whole sampler is one XLA program that traces `model_fn` once.
`debug=True` runs the same step function eagerly in a Python loop.

A model function is `model_fn(x_nhwc, t) -> model_output` with `t` an int32 array of shape (B,);
the caller closes over params, text embeddings and guidance embedding. `timesteps` must be
concrete (numpy or a list): close over them, do not pass them as traced arguments.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models import accounting
from lcm_jax.schedules import NoiseSchedule, ddim_step, dpm_sigmas, predict_x0_eps, \
    scalings_for_boundary_conditions, x0_eps_from_alpha_sigma

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
StepFn = Callable[[Any, dict], tuple[Any, dict]]


# ---------------------------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------------------------


def _concrete_timesteps(timesteps) -> np.ndarray:
    if isinstance(timesteps, jax.core.Tracer):
        raise TypeError(
            "timesteps must be concrete (a numpy array or list), not a traced value: compute them with "
            "lcm_jax.schedules.*_timesteps and close over them instead of passing them into jit"
        )
    timesteps = np.asarray(timesteps, dtype=np.int64)
    if timesteps.ndim != 1 or timesteps.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D array of ints, got shape {timesteps.shape}")
    return timesteps


def _f32(a) -> jax.Array:
    return jnp.asarray(np.asarray(a, dtype=np.float32))


def _run(step_fn: StepFn, carry, xs: dict, debug: bool, return_trajectory: bool):
    """Apply `step_fn` along the leading axis of `xs`: `lax.scan`, or a Python loop if `debug`.

    `step_fn(carry, xs_i) -> (carry, outputs_i)`; the trajectory stacks the outputs per step.
    """
    def body(c, x_i):
        c, out = step_fn(c, x_i)
        return c, (out if return_trajectory else None)

    if debug:
        num_steps = len(jax.tree.leaves(xs)[0])
        outs = []
        for i in range(num_steps):
            carry, out = body(carry, jax.tree.map(lambda a: a[i], xs))
            outs.append(out)
        trajectory = jax.tree.map(lambda *a: jnp.stack(a), *outs) if return_trajectory else None
    else:
        carry, trajectory = jax.lax.scan(body, carry, xs, unroll=accounting.on())  # cost analysis counts one body
    return carry, trajectory


def _finish(x: jax.Array, trajectory, return_trajectory: bool):
    return (x, trajectory) if return_trajectory else x


def _noise_inputs(latents: jax.Array, num_steps: int, rng: Optional[jax.Array],
                  noises: Optional[jax.Array]) -> dict:
    """Per-step noise source: explicit `noises` (num_steps, *latents.shape) or one key per step."""
    if noises is not None:
        expected = (num_steps, *latents.shape)
        if tuple(noises.shape) != expected:
            raise ValueError(
                f"noises must have shape {expected} (num_steps, *latents.shape), got {noises.shape}")
        return {"noise": jnp.asarray(noises)}
    if rng is None and num_steps == 1:  # the only step is the last: no noise is drawn
        return {"noise": jnp.zeros((1, *latents.shape), latents.dtype)}
    if rng is None:
        raise ValueError("pass rng (a jax.random key) or explicit noises for a stochastic sampler")
    return {"key": jax.random.split(rng, num_steps)}


def _draw(xs_i: dict, x: jax.Array) -> jax.Array:
    if "noise" in xs_i:
        return xs_i["noise"].astype(x.dtype)
    return jax.random.normal(xs_i["key"], x.shape, x.dtype)


def _call(model_fn: ModelFn, x: jax.Array, t: jax.Array) -> jax.Array:
    return model_fn(x, jnp.full((x.shape[0],), t, jnp.int32))


def _maybe_clip(x0: jax.Array, schedule: NoiseSchedule) -> jax.Array:
    if schedule.clip_sample:
        return jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
    return x0


class MaskBlend(NamedTuple):
    """Inpainting with a plain (4-channel) UNet, as StableDiffusionInpaintPipeline: after every
    step the kept region (mask 0) is replaced by the image's latents noised to the next timestep
    with `noise` (after the last step: the latents themselves). `mask` (B, h, w, 1): 1 = repaint."""
    image_latents: jax.Array
    mask: jax.Array
    noise: jax.Array


def _ddpm_levels(schedule: NoiseSchedule, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sqrt(abar), sqrt(1 - abar)) at `ts`, float32, as the DDPM-style add_noise computes them."""
    abar = schedule.alpha_bar(ts).astype(np.float32)
    return np.sqrt(abar), np.sqrt(np.float32(1) - abar)


def _blended(step_fn: StepFn, xs: dict, blend: Optional[MaskBlend], a_next: np.ndarray,
             s_next: np.ndarray) -> tuple[StepFn, dict]:
    """`step_fn` followed by the mask blend at levels (a_next, s_next) per step; unchanged if None."""
    if blend is None:
        return step_fn, xs
    xs = {**xs, "blend_a": _f32(a_next), "blend_s": _f32(s_next)}

    def step(carry, s):
        carry, out = step_fn(carry, s)
        x = carry[0] if isinstance(carry, tuple) else carry
        kept = s["blend_a"] * blend.image_latents + s["blend_s"] * blend.noise
        x = ((1 - blend.mask) * kept + blend.mask * x).astype(x.dtype)
        return ((x, *carry[1:]) if isinstance(carry, tuple) else x), out

    return step, xs


def _ddpm_blend_levels(schedule: NoiseSchedule, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The blend's levels after each step: the next timestep's, then clean (1, 0)."""
    a, s = _ddpm_levels(schedule, ts[1:])
    return np.append(a, np.float32(1)), np.append(s, np.float32(0))


# ---------------------------------------------------------------------------------------------
# LCM and TCD
# ---------------------------------------------------------------------------------------------


def lcm_sample(model_fn: ModelFn, latents: jax.Array, schedule: NoiseSchedule, timesteps,
               rng: Optional[jax.Array] = None, *, sigma_data: float = 0.5,
               timestep_scaling: float = 10.0, noises: Optional[jax.Array] = None,
               blend: Optional[MaskBlend] = None, debug: bool = False, return_trajectory: bool = False):
    """Multistep consistency sampling (LCM paper, Alg. 3), equal to diffusers' LCMScheduler.

    Each step maps x_t to the consistency estimate f(x_t, t) = c_skip x_t + c_out x0 and, except
    at the last step, re-noises it to the next timestep with fresh noise from `rng` (or from
    `noises[i]`; `noises[-1]` is unused). Returns the last estimate, or `(x, trajectory)` with
    per-step `prev_sample` and `denoised` when `return_trajectory`.
    """
    ts = _concrete_timesteps(timesteps)
    n = len(ts)
    alpha_prev = np.concatenate([schedule.alpha_bar(ts[1:]), [1.0]]).astype(np.float32)
    c_skip, c_out = scalings_for_boundary_conditions(ts, sigma_data, timestep_scaling)
    xs = {
        "t": jnp.asarray(ts, jnp.int32),
        "alpha_bar": _f32(schedule.alpha_bar(ts)),
        "c_skip": _f32(c_skip), "c_out": _f32(c_out),
        "sqrt_alpha_prev": _f32(np.sqrt(alpha_prev)),
        "sqrt_beta_prev": _f32(np.sqrt(np.float32(1) - alpha_prev)),
        **_noise_inputs(latents, n, rng, noises),
    }

    def step(x, s):
        x0, _ = predict_x0_eps(_call(model_fn, x, s["t"]), x, s["alpha_bar"], schedule.prediction_type)
        denoised = s["c_out"] * _maybe_clip(x0, schedule) + s["c_skip"] * x
        # At the last step sqrt_alpha_prev = 1 and sqrt_beta_prev = 0: the output is `denoised`.
        x_prev = s["sqrt_alpha_prev"] * denoised + s["sqrt_beta_prev"] * _draw(s, x)
        return x_prev.astype(x.dtype), {"prev_sample": x_prev, "denoised": denoised}

    step, xs = _blended(step, xs, blend, *_ddpm_blend_levels(schedule, ts))
    x, trajectory = _run(step, latents, xs, debug, return_trajectory)
    return _finish(x, trajectory, return_trajectory)


def tcd_s_timesteps(timesteps: np.ndarray, gamma: float) -> np.ndarray:
    """TCD's intermediate timesteps s = floor((1 - gamma) t_prev), in float32 like TCDScheduler."""
    t_prev = np.concatenate([timesteps[1:], [0]]).astype(np.float32)
    return np.floor(np.float32(1 - gamma) * t_prev).astype(np.int64)


def tcd_sample(model_fn: ModelFn, latents: jax.Array, schedule: NoiseSchedule, timesteps,
               rng: Optional[jax.Array] = None, *, gamma: float = 0.3, noises: Optional[jax.Array] = None,
               blend: Optional[MaskBlend] = None, debug: bool = False, return_trajectory: bool = False):
    """Strategic stochastic sampling (TCD paper, Alg. 4), equal to diffusers' TCDScheduler (eta=gamma).

    Each step jumps to the predicted x_s at s = floor((1 - gamma) t_prev), then (gamma > 0, not at
    the last step) forward-diffuses from s to t_prev with fresh noise. gamma = 0 is deterministic.
    Trajectory keys: `prev_sample`, `pred_noised_sample`.
    """
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    ts = _concrete_timesteps(timesteps)
    n = len(ts)
    alpha_prev = schedule.alpha_bar(np.concatenate([ts[1:], [0]]))
    alpha_s = schedule.alpha_bar(tcd_s_timesteps(ts, gamma))
    ratio = (alpha_prev / alpha_s).astype(np.float32)
    stochastic = (np.arange(n) < n - 1) & (gamma > 0)
    xs = {
        "t": jnp.asarray(ts, jnp.int32),
        "alpha_bar": _f32(schedule.alpha_bar(ts)),
        "sqrt_alpha_s": _f32(np.sqrt(alpha_s)), "sqrt_beta_s": _f32(np.sqrt(np.float32(1) - alpha_s)),
        "c_keep": _f32(np.where(stochastic, np.sqrt(ratio), 1)),
        "c_noise": _f32(np.where(stochastic, np.sqrt(np.float32(1) - ratio), 0)),
        **(_noise_inputs(latents, n, rng, noises) if gamma > 0 else {}),
    }

    def step(x, s):
        x0, eps = predict_x0_eps(_call(model_fn, x, s["t"]), x, s["alpha_bar"], schedule.prediction_type)
        x_s = s["sqrt_alpha_s"] * x0 + s["sqrt_beta_s"] * eps
        x_prev = s["c_keep"] * x_s + s["c_noise"] * _draw(s, x) if gamma > 0 else x_s
        return x_prev.astype(x.dtype), {"prev_sample": x_prev, "pred_noised_sample": x_s}

    step, xs = _blended(step, xs, blend, *_ddpm_blend_levels(schedule, ts))
    x, trajectory = _run(step, latents, xs, debug, return_trajectory)
    return _finish(x, trajectory, return_trajectory)


# ---------------------------------------------------------------------------------------------
# Teacher baselines: DDIM and DPM-Solver++(2M)
# ---------------------------------------------------------------------------------------------


def ddim_sample(model_fn: ModelFn, latents: jax.Array, schedule: NoiseSchedule, timesteps, *,
                num_inference_steps: Optional[int] = None, blend: Optional[MaskBlend] = None,
                debug: bool = False, return_trajectory: bool = False):
    """Deterministic DDIM (eta = 0), equal to diffusers' DDIMScheduler.

    As in diffusers, the previous timestep is t - T // num_inference_steps (whatever the spacing)
    and a negative one means abar = `final_alpha_cumprod`. `timesteps` may be the tail of a
    `num_inference_steps` schedule (img2img, SDEdit; default: the whole, len(timesteps)): the
    step size stays that of the whole schedule. Trajectory keys: `prev_sample`,
    `pred_original_sample`.
    """
    ts = _concrete_timesteps(timesteps)
    prev = ts - schedule.num_train_timesteps // _schedule_length(num_inference_steps, ts)
    xs = {"t": jnp.asarray(ts, jnp.int32), "alpha_bar": _f32(schedule.alpha_bar(ts)),
          "alpha_bar_prev": _f32(schedule.alpha_bar(prev))}

    def step(x, s):
        model_output = _call(model_fn, x, s["t"])
        x0, eps = predict_x0_eps(model_output, x, s["alpha_bar"], schedule.prediction_type)
        x0 = _maybe_clip(x0, schedule)
        x_prev = ddim_step(x, eps, x0, s["alpha_bar"], s["alpha_bar_prev"])
        return x_prev.astype(x.dtype), {"prev_sample": x_prev, "pred_original_sample": x0}

    step, xs = _blended(step, xs, blend, *_ddpm_blend_levels(schedule, ts))
    x, trajectory = _run(step, latents, xs, debug, return_trajectory)
    return _finish(x, trajectory, return_trajectory)


DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
# DPMSolverMultistepScheduler config keys that are arguments of `dpm_solver_pp_sample`.
DPM_OPTIONS = ("solver_order", "use_karras_sigmas", "final_sigmas_type", "lower_order_final",
               "algorithm_type")


def dpm_options(scheduler_config: dict) -> dict:
    """The `dpm_solver_pp_sample` options a diffusers scheduler config sets (absent keys: defaults)."""
    return {k: scheduler_config[k] for k in DPM_OPTIONS if scheduler_config.get(k) is not None}


def _schedule_length(num_inference_steps: Optional[int], ts: np.ndarray) -> int:
    """The length of the schedule whose tail `ts` is (img2img); `ts` itself by default."""
    n = len(ts) if num_inference_steps is None else int(num_inference_steps)
    if n < len(ts):
        raise ValueError(f"num_inference_steps={n} is shorter than the {len(ts)} timesteps given; "
                         f"it is the length of the schedule they are the tail of")
    return n


def _dpm_coefficients(sigmas: np.ndarray, solver_order: int, last_first_order: bool,
                      sde: bool) -> dict[str, np.ndarray]:
    """Per-step DPM-Solver++ coefficients (Lu et al. 2022b, eqs. 9 and 14, midpoint; the SDE
    variant's eq. 18), float32 in diffusers' order of operations.

    Step i goes from sigma_i to sigma_{i+1} with x_next = c_x x - c_0 D0 - c_half D1 + c_noise z,
    D0 = x0_i, D1 = inv_r0 (x0_i - x0_{i-1}). First-order steps (the first one and, with
    `last_first_order`, the last one) have c_half = inv_r0 = 0.
    """
    with np.errstate(divide="ignore"):
        alpha = np.float32(1) / np.sqrt(sigmas**2 + np.float32(1))
        sigma = sigmas * alpha
        lam = np.log(alpha) - np.log(sigma)
    n = len(sigmas) - 1
    h = lam[1:] - lam[:-1]
    h_prev = np.concatenate([[np.float32(1)], lam[1:n] - lam[:n - 1]]).astype(np.float32)
    if sde:
        c_x = sigma[1:] / sigma[:-1] * np.exp(-h)
        c_0 = -(alpha[1:] * (np.float32(1) - np.exp(np.float32(-2.0) * h)))
        c_noise = sigma[1:] * np.sqrt(np.float32(1) - np.exp(np.float32(-2) * h))
    else:
        c_x, c_0, c_noise = sigma[1:] / sigma[:-1], alpha[1:] * (np.exp(-h) - np.float32(1)), np.zeros_like(h)
    steps = np.arange(n)
    second = (steps > 0) & ~((steps == n - 1) & last_first_order) & (solver_order == 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_r0 = np.float32(1) / (h_prev / h)
    return {
        "alpha": alpha[:-1], "sigma": sigma[:-1], "c_x": c_x, "c_0": c_0, "c_noise": c_noise,
        "c_half": np.where(second, np.float32(0.5) * c_0, 0).astype(np.float32),
        "inv_r0": np.where(second, inv_r0, 0).astype(np.float32),
    }


def _check_dpm(solver_order: int, algorithm_type: str) -> None:
    if solver_order not in (1, 2):
        raise ValueError(f"solver_order must be 1 or 2, got {solver_order}")
    if algorithm_type not in DPM_ALGORITHMS:
        raise ValueError(f"algorithm_type {algorithm_type!r} is not supported; choose one of {DPM_ALGORITHMS}")


def dpm_solver_pp_sample(model_fn: ModelFn, latents: jax.Array, schedule: NoiseSchedule, timesteps,
                         rng: Optional[jax.Array] = None, *, solver_order: int = 2,
                         use_karras_sigmas: bool = False, final_sigmas_type: str = "zero",
                         lower_order_final: bool = True, algorithm_type: str = "dpmsolver++",
                         num_inference_steps: Optional[int] = None, noises: Optional[jax.Array] = None,
                         blend: Optional[MaskBlend] = None, debug: bool = False,
                         return_trajectory: bool = False):
    """Multistep DPM-Solver++ (data prediction, midpoint), equal to diffusers'
    DPMSolverMultistepScheduler with the same options: Karras sigmas (`timesteps` then from
    `schedules.karras_timesteps`), final sigma 0 or sigma_min, a first-order last step (always
    with final sigma 0; with `lower_order_final` below 15 steps), and 'sde-dpmsolver++' (fresh
    noise every step from `rng`, or `noises` (num_steps, *latents.shape)). `timesteps` may be the
    tail of a `num_inference_steps` schedule (img2img). Trajectory keys: `prev_sample`, `x0_pred`.
    """
    _check_dpm(solver_order, algorithm_type)
    ts = _concrete_timesteps(timesteps)
    total = _schedule_length(num_inference_steps, ts)
    sigmas = dpm_sigmas(schedule, ts, final_sigmas_type, use_karras_sigmas, total)
    last_first_order = final_sigmas_type == "zero" or (lower_order_final and total < 15)
    sde = algorithm_type == "sde-dpmsolver++"
    coef = _dpm_coefficients(sigmas, solver_order, last_first_order, sde)
    if sde and rng is None and noises is None:
        raise ValueError("pass rng (a jax.random key) or explicit noises for algorithm_type='sde-dpmsolver++'")
    xs = {"t": jnp.asarray(ts, jnp.int32), **{k: _f32(v) for k, v in coef.items()},
          **(_noise_inputs(latents, len(ts), rng, noises) if sde else {})}

    def step(carry, s):
        x, x0_before = carry
        x0, _ = x0_eps_from_alpha_sigma(_call(model_fn, x, s["t"]), x, s["alpha"], s["sigma"],
                                        schedule.prediction_type)
        d1 = s["inv_r0"] * (x0 - x0_before)
        x_next = s["c_x"] * x - s["c_0"] * x0 - s["c_half"] * d1
        if sde:
            x_next = x_next + s["c_noise"] * _draw(s, x)
        return (x_next.astype(x.dtype), x0.astype(x0_before.dtype)), {"prev_sample": x_next, "x0_pred": x0}

    alpha_next = np.append(coef["alpha"][1:], np.float32(1))  # DPM's add_noise at the next sigma
    step, xs = _blended(step, xs, blend, alpha_next, np.append(coef["sigma"][1:], np.float32(0)))
    init = (latents, jnp.zeros(latents.shape, jnp.promote_types(latents.dtype, jnp.float32)))
    (x, _), trajectory = _run(step, init, xs, debug, return_trajectory)
    return _finish(x, trajectory, return_trajectory)


# ---------------------------------------------------------------------------------------------
# img2img: the starting point from an image's latents
# ---------------------------------------------------------------------------------------------


def noised_latents(sampler: str, x0: jax.Array, noise: jax.Array, schedule: NoiseSchedule,
                   timesteps, *, num_inference_steps: Optional[int] = None, **dpm) -> jax.Array:
    """x0 noised to the first of `timesteps`, as the sampler's diffusers scheduler's add_noise:
    sqrt(abar) x0 + sqrt(1 - abar) noise (LCM, TCD, DDIM); alpha x0 + sigma noise at DPM-Solver's
    first sigma (the Karras one with use_karras_sigmas). `dpm` takes `dpm_solver_pp_sample`'s
    use_karras_sigmas (other options are accepted and ignored)."""
    ts = _concrete_timesteps(timesteps)
    if sampler == "dpm":
        total = _schedule_length(num_inference_steps, ts)
        sigma = dpm_sigmas(schedule, ts, use_karras_sigmas=dpm.get("use_karras_sigmas", False),
                           num_inference_steps=total)[0]
        alpha = np.float32(1) / np.sqrt(sigma**2 + np.float32(1))
        a, s = alpha, sigma * alpha
    else:
        (a,), (s,) = _ddpm_levels(schedule, ts[:1])
    return _f32(a) * x0 + _f32(s) * noise.astype(x0.dtype)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------


def cfg_model_fn(model_fn_uncond_cond: ModelFn, guidance_scale) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022): out = out_u + w (out_c - out_u).

    `model_fn_uncond_cond` sees one concatenated batch of 2B: the first B rows must be run with the
    unconditional (or negative-prompt) embeddings, the last B with the prompt's, as in diffusers.
    """
    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        out = model_fn_uncond_cond(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
        out_uncond, out_cond = jnp.split(out, 2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return model_fn


# ---------------------------------------------------------------------------------------------
# By name
# ---------------------------------------------------------------------------------------------

SAMPLERS = ("lcm", "tcd", "ddim", "dpm")


def sample(sampler: str, model_fn: ModelFn, latents: jax.Array, schedule: NoiseSchedule, timesteps,
           rng: Optional[jax.Array] = None, *, gamma: float = 0.3,
           noises: Optional[jax.Array] = None, debug: bool = False,
           num_inference_steps: Optional[int] = None, dpm: Optional[dict] = None,
           blend: Optional["MaskBlend"] = None) -> jax.Array:
    """The final latents of sampler `sampler` ('lcm', 'tcd', 'ddim' or 'dpm'); `rng`, `noises`
    (LCM, TCD, SDE DPM-Solver++), `gamma` (TCD), `num_inference_steps` (DDIM, DPM: the length of
    the schedule `timesteps` is the tail of) and `dpm` (`dpm_solver_pp_sample`'s options) go to
    the samplers that use them; `blend` (inpainting) to all."""
    common = dict(debug=debug, blend=blend)
    if sampler == "lcm":
        return lcm_sample(model_fn, latents, schedule, timesteps, rng, noises=noises, **common)
    if sampler == "tcd":
        return tcd_sample(model_fn, latents, schedule, timesteps, rng, gamma=gamma, noises=noises, **common)
    if sampler == "ddim":
        return ddim_sample(model_fn, latents, schedule, timesteps, num_inference_steps=num_inference_steps,
                           **common)
    if sampler == "dpm":
        return dpm_solver_pp_sample(model_fn, latents, schedule, timesteps, rng, noises=noises,
                                    num_inference_steps=num_inference_steps, **(dpm or {}), **common)
    raise ValueError(f"sampler {sampler!r} unknown; choose one of {SAMPLERS}")
