"""Consistency losses: latent consistency distillation (LCD), LCM-LoRA, LCF, trajectory consistency
distillation (TCD) and phased consistency (PCM).

Notation follows Luo et al. 2023, "Latent Consistency Models" (LCM), Algorithm 1:
  z          clean latent (VAE latent times scaling_factor), c the text condition,
  t_n        the skipping-step grid of N DDIM timesteps over T (k = T / N apart),
  z_{t_{n+k}} = sqrt(abar) z + sqrt(1 - abar) eps          (forward diffusion, Eq. 1),
  Psi        the teacher's one-step ODE solver (DDIM) on the w-augmented PF-ODE (Eq. 9),
  f_theta(z, w, c, t) = c_skip(t) z + c_out(t) F_theta(z, w, c, t)   (parameterisation, Eq. 5),
  loss       d(f_theta(z_{t_{n+k}}, w, c, t_{n+k}), f_theta-(z^Psi_{t_n}, w, c, t_n))   (Eq. 10).
TCD (Zheng et al. 2024) and PCM (Wang et al. 2024) keep steps 1-3 and 5 and change the consistency
function: f_theta(z, w, c, t, s) maps z_t to z_s for an s <= t_n, in the semi-linear (DDIM,
first-order exponential-integrator) form
  f_theta(z_t, t, s) = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat   ((x0_hat, eps_hat) from F_theta),
which is the identity at s = t, so no c_skip/c_out are needed. TCD draws s on the grid below t_n
(s = G[floor(u (n + 1))], u ~ U[0, 1): an intermediate s = (1 - gamma) t_n, gamma ~ U[0, 1],
put on the grid; the authors released no training code, so this draw is the project's); PCM fixes s to
the lower edge of t's phase (the grid cut into `pcm_phases` phases). The loss is then
d(f_theta(z_{t_{n+k}}, t_{n+k}, s), f_theta-(z^Psi_{t_n}, t_n, s)).
Either function reads the student's raw output F_theta as epsilon, x0 or v (`student_prediction`;
the teacher's own type by default): for an x0 student the one-step error is its output's error
times c_out, not an epsilon error times sqrt(1 - abar) / sqrt(abar) (14.6 at SD's t = 999).
Mixed skipping steps (LCD, `coarse_ddim_timesteps` N_c): a `coarse_fraction` of each batch's hops
go t_{m+1} -> t_m on the coarse grid of N_c timesteps (k_c = T / N_c, a multiple of k) instead, so
the clean latent is carried up to t = 999 in N_c hops while the fine hops keep the grid's accuracy.
The time grid indexing and the w-convention follow diffusers' train_lcm_distill_sd_wds.py, so that
checkpoints are interchangeable: the CFG form is eps_c + w (eps_c - eps_u) and the student embeds
this w (= guidance_scale - 1 at sampling time).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import schedules
from lcm_jax.losses.diffusion import diffusion_target
from lcm_jax.models.layers import guidance_scale_embedding

Params = Any
# model_fn(params, frozen, z_t (B,h,w,c), t (B,), text (B,L,D), w_embedding (B,E) or None,
#          added_cond (dict or None)) -> raw model output (epsilon / v / sample)
ModelFn = Callable[..., jax.Array]


METHODS = ("lcd", "tcd", "pcm")
# The student's output (config name) -> its schedules.PREDICTION_TYPES name.
STUDENT_PREDICTIONS = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
TIMESTEP_SAMPLINGS = ("uniform", "sampler")
# timestep_sampling='sampler' favours the grid timesteps the LCM sampler visits at these step counts.
SAMPLER_STEPS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class ConsistencyConfig:
    num_ddim_timesteps: int = 50      # N; the skipping step is k = T / N
    w_min: float = 5.0                # w ~ U[w_min, w_max]; guidance scale = w + 1
    w_max: float = 15.0
    w_embed_dim: Optional[int] = 256  # None: the student has no w-input (LCM-LoRA)
    loss_type: str = "huber"          # 'l2' or 'huber' (pseudo-Huber)
    huber_c: float = 0.001
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    solver: str = "ddim"              # teacher ODE solver: 'ddim'; 'data' = LCF (no teacher)
    timestep_weighting: str = "uniform"  # lambda(t_{n+k}): 'uniform' (the paper) or 'snr' (below)
    method: str = "lcd"               # the consistency function: 'lcd' | 'tcd' | 'pcm' (module doc)
    student_prediction: str = ""      # the student's output as a schedule prediction type
                                      # ('epsilon' | 'v_prediction' | 'sample'); "": the teacher's
    timestep_sampling: str = "uniform"  # n ~ 'uniform' on the grid | 'sampler' (sampling_probs)
    pcm_phases: int = 4               # PCM: M phases of the grid
    coarse_ddim_timesteps: int = 0    # N_c > 0 (LCD): a coarse_fraction of the hops skip k_c = T / N_c
    coarse_fraction: float = 0.5      # on the coarse grid t_m (check_coarse_grid) instead of k


@dataclasses.dataclass
class ConsistencyTerms:
    """Per-example pieces of the loss, kept for metrics and tests."""
    loss: jax.Array        # (B,)  distance d(., .) averaged over latent elements
    t_start: jax.Array     # (B,)  t_{n+k}
    t_end: jax.Array       # (B,)  t_n
    t_to: jax.Array        # (B,)  s, where f maps to: 0 for LCD (f(z, 0) = z), s <= t_n for TCD/PCM
    w: jax.Array           # (B,)
    model_pred: jax.Array  # (B, h, w, c)  f_theta(z_{t_{n+k}}, s)
    target: jax.Array      # (B, h, w, c)  f_theta-(z^Psi_{t_n}, s)


def ddim_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> np.ndarray:
    """t_n for n = 1..N: round(n k) - 1 with k = T / N  (diffusers' DDIMSolver grid)."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps={num_ddim_timesteps}: the skipping step k = T / N needs "
                         f"1 <= N <= T = {num_train_timesteps} (the teacher's num_train_timesteps)")
    k = num_train_timesteps // num_ddim_timesteps
    return (np.arange(1, num_ddim_timesteps + 1) * k).round().astype(np.int32) - 1


def extended_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> np.ndarray:
    """G = [0, t_1, ..., t_N]: G[n + 1] is the start t_{n+k} of grid index n and G[n] its end t_n
    (max(t_{n+k} - k, 0))."""
    return np.concatenate([[0], ddim_grid(num_train_timesteps, num_ddim_timesteps)]).astype(np.int32)


def sampling_probs(num_train_timesteps: int, cfg: ConsistencyConfig) -> np.ndarray:
    """P(n) over the N grid indices. 'uniform': 1 / N (LCM, Algorithm 1). 'sampler': proportional to
    1 + the number of few-step schedules that visit t_{n+k}: the LCM sampler's timesteps at
    SAMPLER_STEPS steps (LCD, TCD), or the phases' upper edges (PCM): where sampling evaluates the
    student gets more training, and every grid timestep keeps some."""
    n = cfg.num_ddim_timesteps
    if cfg.timestep_sampling == "uniform":
        return np.full(n, 1.0 / n)
    if cfg.timestep_sampling != "sampler":
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {cfg.timestep_sampling!r}")
    grid = ddim_grid(num_train_timesteps, n)
    if cfg.method == "pcm":
        visited = [schedules.pcm_timesteps(num_train_timesteps, n, cfg.pcm_phases)]
    else:
        visited = [schedules.lcm_timesteps(m, n, num_train_timesteps) for m in SAMPLER_STEPS if m <= n]
    weight = 1.0 + sum(np.isin(grid, v).astype(np.float64) for v in visited)
    return weight / weight.sum()


def check_coarse_grid(num_train_timesteps: int, cfg: ConsistencyConfig) -> None:
    """Mixed skipping steps: the coarse grid's timesteps must be on the skipping grid (k divides
    k_c), so that the sampler's and the endpoint error's timesteps keep their meaning; LCD only."""
    T, n, n_c = num_train_timesteps, cfg.num_ddim_timesteps, cfg.coarse_ddim_timesteps
    if cfg.method != "lcd":
        raise ValueError(f"coarse_ddim_timesteps={n_c}: mixed skipping steps are for method 'lcd', "
                         f"not {cfg.method!r}; set it to 0")
    fits = [c for c in range(1, n + 1) if (T // c) % (T // n) == 0]
    if n_c not in fits:
        hint = min(fits, key=lambda c: abs(c - n // 5))
        raise ValueError(f"coarse_ddim_timesteps={n_c}: its skipping step T / N_c = {T // max(n_c, 1)} "
                         f"must be a multiple of k = {T // n} (num_ddim_timesteps={n}); e.g. {hint}")


def end_index(n: jax.Array, u: jax.Array, cfg: ConsistencyConfig) -> jax.Array:
    """Index into the extended grid of s, where f maps z_{t_{n+k}} to: 0 for LCD; TCD
    floor(u (n + 1)) in 0..n (u ~ U[0, 1)); PCM the lower edge of the phase holding n + 1."""
    if cfg.method == "lcd":
        return jnp.zeros_like(n)
    if cfg.method == "tcd":
        return jnp.minimum(jnp.floor(u * (n + 1)).astype(n.dtype), n)
    if cfg.method == "pcm":
        edges = schedules.pcm_edges(cfg.num_ddim_timesteps, cfg.pcm_phases)
        lower = edges[np.searchsorted(edges, np.arange(cfg.num_ddim_timesteps), side="right") - 1]
        return jnp.asarray(lower, n.dtype)[n]
    raise ValueError(f"consistency method must be one of {METHODS}, got {cfg.method!r}")


TIMESTEP_WEIGHTINGS = ("uniform", "snr")


def timestep_weight(abar_t: jax.Array, weighting: str, loss_type: str) -> jax.Array:
    """lambda(t) per example. 'uniform': 1 (LCM, Algorithm 1). 'snr': the distance in x0 space
    brought to the scale of the epsilon error it comes from, capped at 1: x0 - x0' = sqrt(1 / SNR)
    (eps - eps') for an epsilon-predictor, SNR = abar / (1 - abar), so min(1, SNR) for the squared
    error and min(1, sqrt(SNR)) for pseudo-Huber (close to the absolute error). At t = 999 of SD's
    schedule sqrt(SNR) is about 0.07: without it the x0 error there, 14x the epsilon error that
    causes it, dominates the gradient of a UNet shared across timesteps."""
    if weighting == "uniform":
        return jnp.ones_like(abar_t)
    if weighting == "snr":
        snr = abar_t / (1.0 - abar_t)
        return jnp.minimum(1.0, snr if loss_type == "l2" else jnp.sqrt(snr))
    raise ValueError(f"timestep_weighting must be one of {TIMESTEP_WEIGHTINGS}, got {weighting!r}")


def distance(a: jax.Array, b: jax.Array, loss_type: str, huber_c: float) -> jax.Array:
    """d(a, b) per example: mean squared error, or pseudo-Huber sqrt(|a-b|^2 + c^2) - c."""
    sq = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
    if loss_type == "l2":
        return jnp.mean(sq, axis=tuple(range(1, sq.ndim)))
    if loss_type == "huber":
        return jnp.mean(jnp.sqrt(sq + huber_c ** 2) - huber_c, axis=tuple(range(1, sq.ndim)))
    raise ValueError(f"loss_type must be 'l2' or 'huber', got {loss_type!r}")


def make_consistency_loss(student_fn: ModelFn, teacher_fn: Optional[ModelFn],
                          schedule: schedules.NoiseSchedule, cfg: ConsistencyConfig):
    """Builds loss_fn(params, target_params, frozen, batch, rng) -> (loss, ConsistencyTerms).

    `frozen` carries the teacher's parameters (and a LoRA student's base weights); it is an
    argument rather than a closure so that a large teacher stays a sharded input of the jitted
    step instead of becoming a constant baked into the program.
    batch: 'latents' (B,h,w,c), 'prompt_embeds' (B,L,D), 'uncond_embeds' (B,L,D);
    optional 'added_cond' / 'uncond_added_cond' (SDXL micro-conditioning dicts).
    """
    T = schedule.num_train_timesteps
    g = jnp.asarray(extended_grid(T, cfg.num_ddim_timesteps))
    log_p = jnp.asarray(np.log(sampling_probs(T, cfg)), jnp.float32)
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    pred_type, student_pred = schedule.prediction_type, cfg.student_prediction or schedule.prediction_type
    if cfg.method not in METHODS:
        raise ValueError(f"consistency method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.coarse_ddim_timesteps:
        check_coarse_grid(T, cfg)
    g_coarse = jnp.asarray(extended_grid(T, cfg.coarse_ddim_timesteps or cfg.num_ddim_timesteps))

    def f_theta(fn, params, frozen, z_t, t, s, text, w_emb, added):
        return _f_theta(fn, params, frozen, z_t, t, s, text, w_emb, added, abar, student_pred, cfg)

    def loss_fn(params, target_params, frozen, batch, rng):
        z, text = batch["latents"], batch["prompt_embeds"]
        added = batch.get("added_cond")
        b = z.shape[0]
        rng_n, rng_eps, rng_w = jax.random.split(rng, 3)
        # 1. SAMPLE n ~ P(n) (uniform: U{0..N-1}), t_{n+k} = G[n + 1], t_n = G[n] = max(t_{n+k} - k, 0);
        #    s = G[end_index] <= t_n, where f maps to (LCD: 0).
        if cfg.timestep_sampling == "uniform":
            n = jax.random.randint(rng_n, (b,), 0, cfg.num_ddim_timesteps)
        else:
            n = jax.random.categorical(rng_n, log_p, shape=(b,)).astype(jnp.int32)
        t_start, t_end = g[n + 1], g[n]
        if cfg.coarse_ddim_timesteps:  # a coarse_fraction of the hops: m ~ U{0..N_c-1} on the coarse grid
            rng_m, rng_c = jax.random.split(jax.random.fold_in(rng, 4))
            m = jax.random.randint(rng_m, (b,), 0, cfg.coarse_ddim_timesteps)
            coarse = jax.random.uniform(rng_c, (b,)) < cfg.coarse_fraction
            t_start, t_end = jnp.where(coarse, g_coarse[m + 1], t_start), jnp.where(coarse, g_coarse[m], t_end)
        t_to = g[end_index(n, jax.random.uniform(jax.random.fold_in(rng, 3), (b,)), cfg)]
        # 2. FORWARD DIFFUSION to t_{n+k} (Eq. 1).
        eps = jax.random.normal(rng_eps, z.shape, jnp.float32)
        a_start = _bcast(abar[t_start])
        z_start = jnp.sqrt(a_start) * z + jnp.sqrt(1.0 - a_start) * eps
        # 3. GUIDANCE SCALE w ~ U[w_min, w_max] and its embedding (the student's timestep_cond).
        w = jax.random.uniform(rng_w, (b,), jnp.float32, cfg.w_min, cfg.w_max)
        w_emb = guidance_scale_embedding(w, cfg.w_embed_dim) if cfg.w_embed_dim else None
        # 4. ONLINE PREDICTION f_theta(z_{t_{n+k}}, w, c, t_{n+k}, s).
        model_pred = f_theta(student_fn, params, frozen, z_start, t_start, t_to, text, w_emb, added)
        # 5. ONE ODE SOLVER STEP t_{n+k} -> t_n on the w-augmented PF-ODE (Eq. 9).
        if cfg.solver == "data":  # LCF: the data's own estimate, x0 = z and eps = the noise drawn.
            z_end = schedules.ddim_step(z_start, eps, z, a_start, _bcast(abar[t_end]))
        else:
            z_end = _teacher_ddim_step(teacher_fn, frozen, z_start, t_start, t_end, batch, w, abar,
                                       pred_type)
        z_end = jax.lax.stop_gradient(z_end)
        # 6. TARGET f_theta-(z^Psi_{t_n}, w, c, t_n, s), no gradient.
        target = jax.lax.stop_gradient(
            f_theta(student_fn, target_params, frozen, z_end, t_end, t_to, text, w_emb, added))
        # 7. CONSISTENCY DISTANCE (Eq. 10).
        per_example = distance(model_pred, target, cfg.loss_type, cfg.huber_c)
        per_example = per_example * timestep_weight(abar[t_start], cfg.timestep_weighting, cfg.loss_type)
        terms = ConsistencyTerms(per_example, t_start, t_end, t_to, w, model_pred, target)
        return jnp.mean(per_example), terms

    return loss_fn


def make_guidance_loss(student_fn: ModelFn, teacher_fn: ModelFn, schedule: schedules.NoiseSchedule,
                       cfg: ConsistencyConfig):
    """Builds loss_fn(params, target_params, frozen, batch, rng) -> (loss, per_example_loss):
    guidance distillation (Meng et al. 2023, stage one) into the student's parameterisation.

    The w-conditioned student learns the teacher's w-guided prediction at every timestep:
      t ~ U{0..T-1}, z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, w ~ U[w_min, w_max],
      (x0_w, eps_w) = x_c + w (x_c - x_u)   (the teacher's CFG, as in LCD's ODE step),
      L = || F_theta(z_t, w, c, t) - y(x0_w, eps_w) ||^2
    with y the regression target of the student's output type (diffusion.diffusion_target: eps,
    v = sqrt(abar) eps_w - sqrt(1 - abar) x0_w, or x0_w). Its fixed point is the teacher under CFG
    read in the student's parameterisation: the start an x0 or v student of an epsilon teacher
    needs before LCD (model.student_init), which from the teacher's own weights reads epsilon as
    x0 or v. `target_params` is unused."""
    T = schedule.num_train_timesteps
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    pred_type, student_pred = schedule.prediction_type, cfg.student_prediction or schedule.prediction_type

    def loss_fn(params, target_params, frozen, batch, rng):
        del target_params
        z, text = batch["latents"], batch["prompt_embeds"]
        b = z.shape[0]
        rng_t, rng_eps, rng_w = jax.random.split(rng, 3)
        t = jax.random.randint(rng_t, (b,), 0, T)
        eps = jax.random.normal(rng_eps, z.shape, jnp.float32)
        a = _bcast(abar[t])
        z_t = jnp.sqrt(a) * z + jnp.sqrt(1.0 - a) * eps
        w = jax.random.uniform(rng_w, (b,), jnp.float32, cfg.w_min, cfg.w_max)
        w_emb = guidance_scale_embedding(w, cfg.w_embed_dim) if cfg.w_embed_dim else None
        x0_w, eps_w = _teacher_cfg(teacher_fn, frozen, z_t, t, text, batch, w, abar, pred_type)
        y = diffusion_target(x0_w, eps_w, a, student_pred)
        out = student_fn(params, frozen, z_t, t, text, w_emb, batch.get("added_cond"))
        per_example = distance(out, y, "l2", 0.0)
        return jnp.mean(per_example), per_example

    return loss_fn


def make_endpoint_error(student_fn: ModelFn, teacher_fn: ModelFn, schedule: schedules.NoiseSchedule,
                        cfg: ConsistencyConfig, starts: tuple[int, ...]):
    """Builds endpoint_error(params, frozen, batch, w, rng) -> (S,) mean squared errors.

    What LCD is after, measured directly: for each start timestep t_s in `starts` (members of
    the skipping grid t_n), the distance between the student's one-step output f_theta(z_{t_s})
    and the end of the teacher's own ODE chain from the same z_{t_s}: N-grid DDIM steps on the
    w-augmented PF-ODE down to t = 0, where f(z, 0) = z. The loss compares two student outputs,
    so it can fall while the student drifts from this endpoint; this cannot. It costs one
    teacher chain (with CFG) over len(starts) x batch latents, like sampling that many images.
    """
    T = schedule.num_train_timesteps
    grid_np = ddim_grid(T, cfg.num_ddim_timesteps)
    bad = sorted(set(starts) - set(grid_np.tolist()))
    if bad or not starts:
        raise ValueError(f"endpoint-error start timesteps {list(starts)} must be non-empty members of "
                         f"the skipping grid t_n = {grid_np[:3].tolist()}..{grid_np[-1]} "
                         f"(num_ddim_timesteps={cfg.num_ddim_timesteps})")
    grid = jnp.asarray(grid_np)
    k = T // cfg.num_ddim_timesteps
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    pred_type, student_pred = schedule.prediction_type, cfg.student_prediction or schedule.prediction_type
    if cfg.method == "pcm":
        raise ValueError("the endpoint error is a one-step error to t = 0; a PCM student steps one "
                         "phase at a time (leave eval_endpoint_timesteps empty for method 'pcm')")
    start_n = np.searchsorted(grid_np, np.asarray(starts))
    top = int(start_n.max())

    def endpoint_error(params, frozen, batch, w, rng):
        z, b, s = batch["latents"], batch["latents"].shape[0], len(starts)
        tile = lambda x: jnp.concatenate([x] * s, axis=0)
        tiled = {key: (tile(v) if not isinstance(v, dict) else {kk: tile(vv) for kk, vv in v.items()})
                 for key, v in batch.items()}
        n_of = jnp.repeat(jnp.asarray(start_n), b)
        t_s = grid[n_of]
        eps = tile(jax.random.normal(rng, z.shape, jnp.float32))
        a_s = _bcast(abar[t_s])
        z_s = jnp.sqrt(a_s) * tiled["latents"] + jnp.sqrt(1.0 - a_s) * eps
        ws = jnp.full((b * s,), w, jnp.float32)
        w_emb = guidance_scale_embedding(ws, cfg.w_embed_dim) if cfg.w_embed_dim else None
        one_step = _f_theta(student_fn, params, frozen, z_s, t_s, jnp.zeros_like(t_s),
                            tiled["prompt_embeds"], w_emb, tiled.get("added_cond"), abar, student_pred, cfg)

        def hop(i, zc):  # grid index n = top - i, every chain that has started takes the step
            n = top - i
            t = jnp.full((b * s,), grid[n])
            z_prev = _teacher_ddim_step(teacher_fn, frozen, zc, t, jnp.maximum(t - k, 0), tiled, ws,
                                        abar, pred_type)
            return jnp.where((n <= n_of)[:, None, None, None], z_prev, zc)

        endpoint = jax.lax.fori_loop(0, top + 1, hop, z_s)
        sq = jnp.square(one_step.astype(jnp.float32) - endpoint).reshape(s, -1)
        return jnp.mean(sq, axis=1)

    return endpoint_error


def teacher_chain_endpoint(teacher_fn: ModelFn, frozen, batch: dict, z: jax.Array, t_start: int,
                           w, schedule: schedules.NoiseSchedule, num_ddim_timesteps: int) -> jax.Array:
    """The end of the teacher's DDIM chain on the w-augmented PF-ODE from z at grid timestep
    `t_start` (static) down the skipping grid to t = 0: the value LCD's consistency function
    f(z, t_start) converges to. `batch` carries 'prompt_embeds' and 'uncond_embeds' (and SDXL's
    added conditioning) for the rows of z; w is the guidance scale minus 1."""
    T = schedule.num_train_timesteps
    grid = ddim_grid(T, num_ddim_timesteps)
    if int(t_start) not in set(grid.tolist()):
        raise ValueError(f"chain start {t_start} is not on the skipping grid "
                         f"{grid[:3].tolist()}..{grid[-1]} (num_ddim_timesteps={num_ddim_timesteps})")
    k = T // num_ddim_timesteps
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    b = z.shape[0]
    ws = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,))

    def hop(i, zc):
        t = jnp.full((b,), t_start - i * k)
        return _teacher_ddim_step(teacher_fn, frozen, zc, t, jnp.maximum(t - k, 0), batch, ws, abar,
                                  schedule.prediction_type)

    return jax.lax.fori_loop(0, int(np.searchsorted(grid, t_start)) + 1, hop, z.astype(jnp.float32))


def _f_theta(fn, params, frozen, z_t, t, s, text, w_emb, added, abar, pred_type, cfg):
    """The consistency function at (z_t, t) towards s, from the student's raw output read as
    `pred_type`. LCD, Eq. 5: c_skip(t) z_t + c_out(t) x0_hat (s is 0). TCD/PCM, semi-linear:
    sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat."""
    out = fn(params, frozen, z_t, t, text, w_emb, added)
    x0, eps = schedules.predict_x0_eps(out, z_t, _bcast(abar[t]), pred_type)
    if cfg.method != "lcd":
        return schedules.ddim_step(z_t, eps, x0, _bcast(abar[t]), _bcast(abar[s]))
    c_skip, c_out = schedules.scalings_for_boundary_conditions(
        t, sigma_data=cfg.sigma_data, timestep_scaling=cfg.timestep_scaling)
    return _bcast(c_skip) * z_t + _bcast(c_out) * x0


def _teacher_ddim_step(teacher_fn, frozen, z_t, t, t_prev, batch, w, abar, pred_type):
    """One DDIM step t -> t_prev of the teacher on the w-augmented PF-ODE (Eq. 9): the step LCD
    solves per example and the endpoint chains repeat."""
    x0, eps = _teacher_cfg(teacher_fn, frozen, z_t, t, batch["prompt_embeds"], batch, w, abar, pred_type)
    return schedules.ddim_step(z_t, eps, x0, _bcast(abar[t]), _bcast(abar[t_prev]))


def _teacher_cfg(teacher_fn, frozen, z_t, t, text, batch, w, abar, pred_type):
    """Teacher x0 and eps with the LCM CFG form: x_c + w (x_c - x_u), one batched pass."""
    b = z_t.shape[0]
    both_text = jnp.concatenate([text, batch["uncond_embeds"]], axis=0)
    added = batch.get("added_cond")
    both_added = None
    if added is not None:
        un = batch.get("uncond_added_cond", added)
        both_added = {key: jnp.concatenate([added[key], un[key]], axis=0) for key in added}
    out = teacher_fn(None, frozen, jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]),
                     both_text, None, both_added)
    out = jax.lax.stop_gradient(out.astype(jnp.float32))
    a = _bcast(abar[t])
    x0_c, eps_c = schedules.predict_x0_eps(out[:b], z_t, a, pred_type)
    x0_u, eps_u = schedules.predict_x0_eps(out[b:], z_t, a, pred_type)
    wb = _bcast(w)
    return x0_c + wb * (x0_c - x0_u), eps_c + wb * (eps_c - eps_u)


def ema_update(target_params: Params, params: Params, decay: float) -> Params:
    """theta- <- decay * theta- + (1 - decay) * theta (stop-gradient EMA, LCM Alg. 1)."""
    return jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * jax.lax.stop_gradient(p).astype(t.dtype),
                        target_params, params)


def _bcast(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)[:, None, None, None]
