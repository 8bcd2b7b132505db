"""Consistency (LCD / LCM-LoRA / LCF) and diffusion losses against the paper's formulas in numpy.

The models are small fixed nonlinear functions written once for both `jnp` and `np`; the numpy
reference recomputes Algorithm 1 of the LCM paper (Luo et al. 2023) in float64 from the same
random draws (the loss's `jax.random` calls are repeated with the same keys), so every formula
of the loss (n and t_n, forward diffusion, w and its embedding, the CFG-augmented teacher, the
DDIM step, c_skip/c_out, the EMA target, the distance) is checked independently.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from lcm_jax import schedules
from lcm_jax.losses import consistency, diffusion
from lcm_jax.losses.consistency import ConsistencyConfig, ddim_grid, ema_update, make_consistency_loss

TOL = 1e-5
B, H, W, C, L, D, E = 2, 4, 4, 4, 3, 8, 8


# ---------------------------------------------------------------------------------------------
# Toy models and batch (the same functions for jnp and numpy)
# ---------------------------------------------------------------------------------------------


def _net(xp, p, z, t, text, w_emb):
    """A small nonlinear F(z, t, c, w): depends on every input so that each one matters."""
    h = xp.tanh(z @ p["A"] + p["b"]) * (1.0 + t[:, None, None, None] / 1000.0)
    h = h + (xp.mean(text, axis=1) @ p["u"])[:, None, None, :]
    if w_emb is not None:
        h = h + (w_emb @ p["v"])[:, None, None, :]
    return h


def _params(seed: int) -> dict:
    """Weights of `_net`. The w-embedding's weights are small: its float32 argument 1000 w freq
    (~1e4, as in diffusers) is only good to ~1e-4, which must not dominate the 1e-5 comparisons."""
    rng = np.random.default_rng(seed)
    shapes = {"A": (C, C, 0.5), "b": (C, 0.5), "u": (D, C, 0.5), "v": (E, C, 0.02)}
    return {k: (s[-1] * rng.standard_normal(s[:-1])).astype(np.float32) for k, s in shapes.items()}


def student_fn(params, frozen, z, t, text, w_emb, added):
    return _net(jnp, params, z, t, text, w_emb)


def teacher_fn(params, frozen, z, t, text, w_emb, added):
    assert params is None and w_emb is None  # the teacher is frozen and not w-conditioned
    return _net(jnp, frozen["teacher"], z, t, text, None)


def _batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"latents": rng.standard_normal((B, H, W, C)).astype(np.float32),
            "prompt_embeds": rng.standard_normal((B, L, D)).astype(np.float32),
            "uncond_embeds": rng.standard_normal((B, L, D)).astype(np.float32)}


PARAMS, TARGET, TEACHER = _params(1), _params(2), _params(3)
FROZEN = {"teacher": TEACHER}


# ---------------------------------------------------------------------------------------------
# The paper's formulas in numpy (float64)
# ---------------------------------------------------------------------------------------------


def np_alphas_cumprod(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """Stable Diffusion's scaled-linear schedule: abar_t = prod (1 - beta_s)."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def np_x0_eps(out, z_t, a, pred_type):
    """(x0, eps) from a model output at abar = a, for z_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    al, si = np.sqrt(a), np.sqrt(1.0 - a)
    if pred_type == "epsilon":
        return (z_t - si * out) / al, out
    if pred_type == "v_prediction":  # v = al eps - si x0
        return al * z_t - si * out, si * z_t + al * out
    return out, (z_t - al * out) / si


def np_w_embedding(w, dim):
    """[sin, cos] of 1000 w at frequencies 10000^(-i / (dim/2 - 1)); the argument is formed in
    float32 as in diffusers (at 1000 w ~ 1e4 its rounding is ~1e-3, part of the definition)."""
    half, f32 = dim // 2, np.float32
    freqs = np.exp(np.arange(half, dtype=f32) * f32(-np.log(10000.0) / (half - 1)))
    args = ((f32(1000.0) * np.asarray(w, f32))[:, None] * freqs[None]).astype(np.float64)
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def np_c_skip_c_out(t, sigma_data=0.5, scaling=10.0):
    s = scaling * np.asarray(t, np.float64)
    return sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s / np.sqrt(s ** 2 + sigma_data ** 2)


def np_sampling_probs(cfg: ConsistencyConfig, T: int = 1000) -> np.ndarray:
    """P(n): uniform, or 'sampler': 1 + how many of diffusers' LCMScheduler schedules at 1, 2, 4 and
    8 steps (PCM: the phases' upper edges floor(i N / M), i >= 1) visit t_{n+k}, normalised."""
    N = cfg.num_ddim_timesteps
    if cfg.timestep_sampling == "uniform":
        return np.full(N, 1.0 / N)
    grid = np.arange(1, N + 1) * (T // N) - 1
    if cfg.method == "pcm":
        visited = [[grid[(i * N) // cfg.pcm_phases - 1] for i in range(1, cfg.pcm_phases + 1)]]
    else:
        visited = []
        for m in (1, 2, 4, 8):
            sched = LCMScheduler()
            sched.set_timesteps(num_inference_steps=m, original_inference_steps=N)
            visited.append(sched.timesteps.numpy())
    w = 1.0 + np.array([sum(t in set(np.asarray(v).tolist()) for v in visited) for t in grid], np.float64)
    return w / w.sum()


def np_end_index(n, u, cfg: ConsistencyConfig) -> np.ndarray:
    """s's index in [0, t_1, ..., t_N]: LCD 0; TCD floor(u (n + 1)); PCM the largest phase edge
    floor(i N / M) <= n."""
    if cfg.method == "lcd":
        return np.zeros_like(n)
    if cfg.method == "tcd":
        return np.floor(u * (n + 1)).astype(n.dtype)
    edges = [(i * cfg.num_ddim_timesteps) // cfg.pcm_phases for i in range(cfg.pcm_phases + 1)]
    return np.array([max(e for e in edges if e <= m) for m in n])


def np_draws(rng, cfg: ConsistencyConfig):
    """The loss's draws, repeated with the same keys: n ~ P(n), eps ~ N(0, I), w ~ U[w_min, w_max]."""
    rng_n, rng_eps, rng_w = jax.random.split(rng, 3)
    if cfg.timestep_sampling == "uniform":
        n = np.asarray(jax.random.randint(rng_n, (B,), 0, cfg.num_ddim_timesteps))
    else:
        n = np.asarray(jax.random.categorical(rng_n, jnp.log(np_sampling_probs(cfg)), shape=(B,)))
    eps = np.asarray(jax.random.normal(rng_eps, (B, H, W, C), jnp.float32), np.float64)
    w = np.asarray(jax.random.uniform(rng_w, (B,), jnp.float32, cfg.w_min, cfg.w_max), np.float64)
    return n, eps, w


def np_consistency_loss(params, target, teacher, batch, rng, cfg, pred_type, T=1000):
    """LCM Algorithm 1, one step: returns (loss, t_{n+k}, t_n, model_pred, target)."""
    f64 = lambda tree: {k: np.asarray(v, np.float64) for k, v in tree.items()}
    params, target, teacher = f64(params), f64(target), f64(teacher)
    z, c, c_u = (np.asarray(batch[k], np.float64) for k in ("latents", "prompt_embeds", "uncond_embeds"))
    abar = np_alphas_cumprod(T)
    n, eps, w = np_draws(rng, cfg)
    k = T // cfg.num_ddim_timesteps
    t_start = (n + 1) * k - 1                     # t_{n+k}: the skipping-step grid k-1, 2k-1, ...
    if cfg.coarse_ddim_timesteps:                 # mixed skipping steps: some hops skip k_c
        rng_m, rng_c = jax.random.split(jax.random.fold_in(rng, 4))
        m = np.asarray(jax.random.randint(rng_m, (B,), 0, cfg.coarse_ddim_timesteps))
        coarse = np.asarray(jax.random.uniform(rng_c, (B,))) < cfg.coarse_fraction
        k = np.where(coarse, T // cfg.coarse_ddim_timesteps, k)
        t_start = np.where(coarse, (m + 1) * k - 1, t_start)
    t_end = np.maximum(t_start - k, 0)            # t_n
    m = np_end_index(n, np.asarray(jax.random.uniform(jax.random.fold_in(rng, 3), (B,))), cfg)
    t_to = np.where(m == 0, 0, m * k - 1)         # s: grid index m (0 is t = 0)
    assert np.all(t_to <= t_end)
    a_s, a_e = abar[t_start][:, None, None, None], abar[t_end][:, None, None, None]
    a_to = abar[t_to][:, None, None, None]
    z_s = np.sqrt(a_s) * z + np.sqrt(1 - a_s) * eps  # forward diffusion (Eq. 1)
    w_emb = np_w_embedding(w, cfg.w_embed_dim) if cfg.w_embed_dim else None
    student_pred = cfg.student_prediction or pred_type

    def f(p, z_t, t, a):  # Eq. 5 (LCD), or the semi-linear map to s (TCD, PCM)
        x0, e = np_x0_eps(_net(np, p, z_t, t.astype(np.float64), c, w_emb), z_t, a, student_pred)
        if cfg.method != "lcd":
            return np.sqrt(a_to) * x0 + np.sqrt(1 - a_to) * e
        c_skip, c_out = np_c_skip_c_out(t, cfg.sigma_data, cfg.timestep_scaling)
        return c_skip[:, None, None, None] * z_t + c_out[:, None, None, None] * x0

    model_pred = f(params, z_s, t_start, a_s)
    if cfg.solver == "data":  # LCF: the data's own x0 and noise
        x0, e = z, eps
    else:  # CFG-augmented teacher, LCM form: x_c + w (x_c - x_u)
        x0_c, e_c = np_x0_eps(_net(np, teacher, z_s, t_start.astype(np.float64), c, None), z_s, a_s, pred_type)
        x0_u, e_u = np_x0_eps(_net(np, teacher, z_s, t_start.astype(np.float64), c_u, None), z_s, a_s, pred_type)
        wb = w[:, None, None, None]
        x0, e = x0_c + wb * (x0_c - x0_u), e_c + wb * (e_c - e_u)
    z_e = np.sqrt(a_e) * x0 + np.sqrt(1 - a_e) * e  # DDIM step t_{n+k} -> t_n
    tgt = f(target, z_e, t_end, a_e)
    d = model_pred - tgt
    if cfg.loss_type == "l2":
        per = np.mean(d ** 2, axis=(1, 2, 3))
    else:
        per = np.mean(np.sqrt(d ** 2 + cfg.huber_c ** 2) - cfg.huber_c, axis=(1, 2, 3))
    if cfg.timestep_weighting == "snr":  # epsilon-scale error, capped at 1
        snr = abar[t_start] / (1 - abar[t_start])
        per = per * np.minimum(1.0, snr if cfg.loss_type == "l2" else np.sqrt(snr))
    return per.mean(), t_start, t_end, model_pred, tgt, t_to


def _rel(a, ref) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# Consistency loss
# ---------------------------------------------------------------------------------------------


def _equals_numpy(cfg: ConsistencyConfig, seed: int, pred_type: str = "epsilon"):
    """The loss on the toy models against the float64 reference, draw for draw: the timesteps
    (t_{n+k}, t_n, s), both sides of the distance and the loss. Returns (loss, terms, reference)."""
    loss_fn = make_consistency_loss(student_fn, teacher_fn, schedules.NoiseSchedule(prediction_type=pred_type), cfg)
    rng, batch = jax.random.key(seed), _batch(seed)
    loss, terms = loss_fn(PARAMS, TARGET, FROZEN, batch, rng)
    ref, t_start, t_end, pred, tgt, t_to = np_consistency_loss(PARAMS, TARGET, TEACHER, batch, rng, cfg, pred_type)
    for got, want in [(terms.t_start, t_start), (terms.t_end, t_end), (terms.t_to, t_to)]:
        np.testing.assert_array_equal(got, want)
    assert _rel(terms.model_pred, pred) <= TOL and _rel(terms.target, tgt) <= TOL
    assert abs(float(loss) - ref) <= TOL * abs(ref)
    return loss, terms, ref


@pytest.mark.parametrize("weighting", ["uniform", "snr"])
@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("loss_type", ["l2", "huber"])
@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction", "sample"])
def test_lcd_loss_equals_numpy_algorithm(pred_type, loss_type, seed, weighting):
    cfg = ConsistencyConfig(num_ddim_timesteps=50, w_embed_dim=E, loss_type=loss_type,
                            timestep_weighting=weighting)
    loss, terms, ref = _equals_numpy(cfg, seed, pred_type)
    np.testing.assert_allclose(terms.w, np_draws(jax.random.key(seed), cfg)[2], rtol=1e-6)
    assert abs(float(loss) - float(jnp.mean(terms.loss))) <= 1e-7 * abs(ref)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("sampling", ["uniform", "sampler"])
@pytest.mark.parametrize("student", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("method", ["lcd", "tcd", "pcm"])
def test_methods_and_parameterisations_equal_numpy(method, student, sampling, seed):
    """TCD (s <= t_n on the grid), PCM (s = the phase's lower edge), a student whose output is read
    as epsilon, x0 or v with an epsilon teacher, and sampler-weighted n: the loss against the
    float64 reference. N = 10 so that both draws of B = 2 cover several phases and weights."""
    cfg = ConsistencyConfig(num_ddim_timesteps=10, w_embed_dim=E, loss_type="l2", method=method,
                            student_prediction=student, timestep_sampling=sampling, pcm_phases=3)
    _equals_numpy(cfg, seed)


@pytest.mark.parametrize("seed", [0, 3, 7])
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_mixed_skipping_steps_equal_numpy(fraction, seed):
    """coarse_ddim_timesteps N_c = 10 on N = 50: a `fraction` of the hops go t_{m+1} -> t_m on the
    coarse grid 99, 199, .., 999 (k_c = 100), the rest t_{n+k} -> t_n (k = 20), against the
    float64 reference (its own draws of m and of which hops are coarse)."""
    cfg = ConsistencyConfig(num_ddim_timesteps=50, w_embed_dim=E, loss_type="l2",
                            coarse_ddim_timesteps=10, coarse_fraction=fraction)
    _, terms, _ = _equals_numpy(cfg, seed)
    hops = np.asarray(terms.t_start) - np.asarray(terms.t_end)
    assert set(hops.tolist()) <= {19, 20, 99, 100}  # 19, 99: the first hops, to t = 0
    if fraction == 1.0:
        assert np.all(np.isin(terms.t_start, np.arange(1, 11) * 100 - 1)) and np.all(hops >= 99)


def test_mixed_skipping_steps_draw_the_coarse_fraction():
    """Over 4000 examples a quarter of the hops are coarse (within 4 standard errors), their starts
    uniform over the 10 coarse timesteps; a coarse grid off the skipping grid, or with TCD, is refused."""
    cfg = ConsistencyConfig(num_ddim_timesteps=50, w_embed_dim=None, w_min=0.0, w_max=0.0,
                            loss_type="l2", coarse_ddim_timesteps=10, coarse_fraction=0.25)
    zero = lambda params, frozen, z, t, text, w_emb, added: jnp.zeros_like(z)
    loss_fn = make_consistency_loss(zero, zero, schedules.NoiseSchedule(), cfg)
    b = 4000
    batch = {"latents": jnp.zeros((b, 1, 1, 1)), "prompt_embeds": jnp.zeros((b, 1, 1)),
             "uncond_embeds": jnp.zeros((b, 1, 1))}
    _, terms = loss_fn({}, {}, None, batch, jax.random.key(0))
    coarse = np.asarray(terms.t_start - terms.t_end) >= 99
    assert abs(coarse.mean() - 0.25) <= 4 * np.sqrt(0.25 * 0.75 / b)
    starts = np.bincount((np.asarray(terms.t_start)[coarse] + 1) // 100 - 1, minlength=10)
    assert starts.min() > 0.5 * coarse.sum() / 10
    for bad, match in [(dict(coarse_ddim_timesteps=15), r"coarse_ddim_timesteps=15: its skipping step "
                        r"T / N_c = 66 must be a multiple of k = 20 \(num_ddim_timesteps=50\)"),
                       (dict(method="tcd"), "mixed skipping steps are for method 'lcd', not 'tcd'")]:
        with pytest.raises(ValueError, match=match):
            make_consistency_loss(zero, zero, schedules.NoiseSchedule(), dataclasses.replace(cfg, **bad))


@pytest.mark.parametrize("method", ["tcd", "pcm"])
def test_semi_linear_function_is_the_identity_at_s_equal_t(method):
    """f(z, t, s = t) = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat = z whatever the network says:
    the boundary condition TCD and PCM get from their parameterisation. With N = 1 every s is 0 =
    t_n, so the target is z^Psi_0, the teacher's one DDIM step 999 -> 0."""
    cfg = ConsistencyConfig(num_ddim_timesteps=1, w_embed_dim=E, loss_type="l2", method=method,
                            pcm_phases=1)
    loss_fn = make_consistency_loss(student_fn, teacher_fn, schedules.NoiseSchedule(), cfg)
    rng, batch = jax.random.key(2), _batch(2)
    _, terms = loss_fn(PARAMS, TARGET, FROZEN, batch, rng)
    np.testing.assert_array_equal(terms.t_to, [0, 0])
    abar = np_alphas_cumprod()
    eps = np_draws(rng, cfg)[1]
    z_s = np.sqrt(abar[999]) * batch["latents"] + np.sqrt(1 - abar[999]) * eps
    out = lambda c: _net(np, {k: v.astype(np.float64) for k, v in TEACHER.items()}, z_s,
                         np.full(B, 999.0), batch[c].astype(np.float64), None)
    w = np_draws(rng, cfg)[2][:, None, None, None]
    e = out("prompt_embeds") + w * (out("prompt_embeds") - out("uncond_embeds"))
    x0 = (z_s - np.sqrt(1 - abar[999]) * e) / np.sqrt(abar[999])
    np.testing.assert_allclose(terms.target, np.sqrt(abar[0]) * x0 + np.sqrt(1 - abar[0]) * e,
                               rtol=1e-4, atol=1e-4)


def test_sampler_weighting_draws_its_distribution():
    """timestep_sampling='sampler': the draw frequencies of n over 40000 examples are the reference
    P(n) (LCMScheduler's 1/2/4/8-step timesteps up-weighted) within 4 standard errors; the
    visited timesteps have twice or more the weight of the rest."""
    cfg = ConsistencyConfig(num_ddim_timesteps=50, timestep_sampling="sampler")
    p = np_sampling_probs(cfg)
    np.testing.assert_allclose(consistency.sampling_probs(1000, cfg), p, rtol=1e-12)
    grid = ddim_grid(1000, 50)
    assert p[grid == 999] / p[grid == 19] == 5.0  # t = 999 starts all four schedules
    count = 40000
    n = np.asarray(jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(count,)))
    freq = np.bincount(n, minlength=50) / count
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / count) + 1e-9)
    with pytest.raises(ValueError, match="timestep_sampling must be one of .* got 'snr'"):
        consistency.sampling_probs(1000, ConsistencyConfig(timestep_sampling="snr"))


def test_pcm_edges_and_sampler_timesteps():
    """M = 4 phases of N = 50: edges at grid indices 0, 12, 25, 37, 50; the sampler visits the
    upper edges 999, 739, 499, 239 (t = 20 i - 1 at index i), and the TCD sampler at gamma = 0
    steps to the next edge (tcd_s_timesteps equals the next timestep, then 0)."""
    from lcm_jax.sampling import tcd_s_timesteps
    np.testing.assert_array_equal(schedules.pcm_edges(50, 4), [0, 12, 25, 37, 50])
    ts = schedules.pcm_timesteps(1000, 50, 4)
    np.testing.assert_array_equal(ts, [999, 739, 499, 239])
    np.testing.assert_array_equal(tcd_s_timesteps(ts, 0.0), [739, 499, 239, 0])
    with pytest.raises(ValueError, match=r"pcm_phases=51: must be in \[1, num_ddim_timesteps=50\]"):
        schedules.pcm_edges(50, 51)


def test_lcm_lora_student_without_w_embedding():
    """w_embed_dim=None (LCM-LoRA): the student sees no w, the teacher's CFG still uses it."""
    cfg = ConsistencyConfig(num_ddim_timesteps=50, w_embed_dim=None, w_min=3.0, w_max=13.0, loss_type="huber")
    seen = []

    def student(params, frozen, z, t, text, w_emb, added):
        seen.append(w_emb)
        return student_fn(params, frozen, z, t, text, w_emb, added)

    loss_fn = make_consistency_loss(student, teacher_fn, schedules.NoiseSchedule(), cfg)
    rng, batch = jax.random.key(3), _batch(3)
    loss, terms = loss_fn(PARAMS, PARAMS, FROZEN, batch, rng)
    assert seen == [None, None]
    ref, *_, tgt, _ = np_consistency_loss(PARAMS, PARAMS, TEACHER, batch, rng, cfg, "epsilon")
    assert _rel(terms.target, tgt) <= TOL
    assert abs(float(loss) - ref) <= TOL * abs(ref)


def test_lcf_target_is_forward_diffusion_of_the_data():
    """solver='data' (LCF): z_{t_n} = sqrt(abar_n) z + sqrt(1 - abar_n) eps, no teacher call."""
    cfg = ConsistencyConfig(num_ddim_timesteps=50, w_embed_dim=E, w_min=7.0, w_max=7.0, solver="data",
                            loss_type="l2")
    loss_fn = make_consistency_loss(student_fn, None, schedules.NoiseSchedule(), cfg)
    rng, batch = jax.random.key(5), _batch(5)
    loss, terms = loss_fn(PARAMS, TARGET, {}, batch, rng)
    ref, _, _, _, tgt, _ = np_consistency_loss(PARAMS, TARGET, TEACHER, batch, rng, cfg, "epsilon")
    np.testing.assert_allclose(terms.w, 7.0)
    assert _rel(terms.target, tgt) <= TOL
    assert abs(float(loss) - ref) <= TOL * abs(ref)


@pytest.mark.parametrize("dim,atol", [(8, 1e-4), (256, 2e-3), (255, 2e-3)])
def test_w_embedding_equals_diffusers(dim, atol):
    """The student's timestep_cond; float32 arguments up to 1000 w = 1.5e4 bound the agreement."""
    from diffusers import LatentConsistencyModelPipeline
    w = np.array([0.0, 0.5, 3.0, 7.5, 14.9], np.float32)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.from_numpy(w), embedding_dim=dim).numpy()
    ours = np.asarray(consistency.guidance_scale_embedding(jnp.asarray(w), dim))
    assert ours.shape == ref.shape == (5, dim)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
    np.testing.assert_allclose(ours[:, :dim - dim % 2], np_w_embedding(w, dim), atol=atol)


def test_ddim_step_with_true_x0_eps_is_forward_diffusion():
    rng = np.random.default_rng(0)
    z, eps = rng.standard_normal((2, B, H, W, C)).astype(np.float32)
    abar = schedules.NoiseSchedule().alphas_cumprod
    a_s, a_e = abar[[979, 459]][:, None, None, None], abar[[959, 439]][:, None, None, None]
    z_s = np.sqrt(a_s) * z + np.sqrt(1 - a_s) * eps
    x0, e = schedules.predict_x0_eps(z_s * 0 + eps, z_s, a_s, "epsilon")
    stepped = schedules.ddim_step(z_s, e, x0, a_s, a_e)
    np.testing.assert_allclose(stepped, np.sqrt(a_e) * z + np.sqrt(1 - a_e) * eps, rtol=0, atol=2e-5)


def test_boundary_condition_f_at_zero_is_identity():
    c_skip, c_out = schedules.scalings_for_boundary_conditions(jnp.zeros((1,), jnp.int32))
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    # In the loss: with N = 1 the only step goes t_{n+k} = 999 -> t_n = 0, so the target is
    # f_theta-(z_0, 0) = z_0 = sqrt(abar_0) z + sqrt(1 - abar_0) eps whatever the model says.
    cfg = ConsistencyConfig(num_ddim_timesteps=1, w_embed_dim=E, solver="data", timestep_scaling=10.0)
    loss_fn = make_consistency_loss(student_fn, None, schedules.NoiseSchedule(), cfg)
    rng, batch = jax.random.key(1), _batch(1)
    _, terms = loss_fn(PARAMS, TARGET, {}, batch, rng)
    np.testing.assert_array_equal(terms.t_start, [999, 999])
    np.testing.assert_array_equal(terms.t_end, [0, 0])
    a0 = np_alphas_cumprod()[0]
    z0 = np.sqrt(a0) * batch["latents"] + np.sqrt(1 - a0) * np_draws(rng, cfg)[1]
    np.testing.assert_allclose(terms.target, z0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scaling", [10.0, 1.0])
def test_scalings_equal_diffusers_lcm_scheduler(scaling):
    sched = LCMScheduler(timestep_scaling=scaling)
    ts = np.array([0, 1, 19, 259, 999])
    c_skip, c_out = schedules.scalings_for_boundary_conditions(jnp.asarray(ts), timestep_scaling=scaling)
    for i, t in enumerate(ts):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(float(t)))
        assert abs(float(c_skip[i]) - float(ref_skip)) <= 1e-6 * max(float(ref_skip), 1e-30)
        assert abs(float(c_out[i]) - float(ref_out)) <= 1e-6 * max(float(ref_out), 1e-30)
    np.testing.assert_allclose(np.asarray(c_skip), np_c_skip_c_out(ts, scaling=scaling)[0], rtol=1e-6)


@pytest.mark.parametrize("n", [50, 20, 30, 1])
def test_ddim_grid_equals_diffusers_solver(n):
    """diffusers' DDIMSolver: t = round(i * (T // N)) - 1 for i = 1..N; also LCMScheduler's
    skipping-step schedule when it samples all N steps."""
    k = 1000 // n
    expected = np.array([i * k - 1 for i in range(1, n + 1)])
    np.testing.assert_array_equal(ddim_grid(1000, n), expected)
    sched = LCMScheduler()
    sched.set_timesteps(num_inference_steps=n, original_inference_steps=n)
    np.testing.assert_array_equal(ddim_grid(1000, n), np.sort(sched.timesteps.numpy()))


def test_t_end_is_t_start_minus_k_clamped():
    """N = 4: t_{n+k} in {249, 499, 749, 999}, t_n = t_{n+k} - 250 and 0 for n = 0."""
    cfg = ConsistencyConfig(num_ddim_timesteps=4, w_embed_dim=E, solver="data")
    loss_fn = make_consistency_loss(student_fn, None, schedules.NoiseSchedule(), cfg)
    starts, ends = [], []
    for seed in (0, 2, 4):  # together these draw every n
        _, terms = loss_fn(PARAMS, TARGET, {}, _batch(), jax.random.key(seed))
        starts += list(np.asarray(terms.t_start))
        ends += list(np.asarray(terms.t_end))
    assert set(starts) == {249, 499, 749, 999}
    np.testing.assert_array_equal(ends, np.maximum(np.array(starts) - 250, 0))


def test_gradient_flows_only_through_online_prediction():
    cfg = ConsistencyConfig(num_ddim_timesteps=50, w_embed_dim=E, loss_type="huber")
    loss_fn = make_consistency_loss(student_fn, teacher_fn, schedules.NoiseSchedule(), cfg)
    batch, rng = _batch(), jax.random.key(0)
    grads = jax.grad(lambda p, t, f: loss_fn(p, t, f, batch, rng)[0], argnums=(0, 1, 2))(
        PARAMS, TARGET, FROZEN)
    g_params, g_target, g_frozen = (jax.tree.leaves(g) for g in grads)
    assert all(np.all(np.asarray(g) == 0) for g in g_target + g_frozen)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in g_params)
    # the online prediction alone carries the gradient: d loss / d theta equals the VJP through
    # model_pred with the target held fixed
    _, terms = loss_fn(PARAMS, TARGET, FROZEN, batch, rng)
    eps = np_draws(rng, cfg)[1]
    a = jnp.asarray(schedules.NoiseSchedule().alphas_cumprod)[terms.t_start][:, None, None, None]
    z_s = jnp.sqrt(a) * batch["latents"] + jnp.sqrt(1 - a) * eps
    w_emb = consistency.guidance_scale_embedding(terms.w, E)

    def online(p):
        out = student_fn(p, None, z_s, terms.t_start, batch["prompt_embeds"], w_emb, None)
        x0 = (z_s - jnp.sqrt(1 - a) * out) / jnp.sqrt(a)
        c_skip, c_out = schedules.scalings_for_boundary_conditions(terms.t_start)
        pred = c_skip[:, None, None, None] * z_s + c_out[:, None, None, None] * x0
        return jnp.mean(consistency.distance(pred, terms.target, "huber", cfg.huber_c))

    for g, ref in zip(g_params, jax.tree.leaves(jax.grad(online)(PARAMS))):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-7)


def test_distance_formulas_and_error():
    a = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 3, 2)), jnp.float32)
    b = jnp.zeros_like(a)
    an = np.asarray(a, np.float64)
    np.testing.assert_allclose(consistency.distance(a, b, "l2", 0.1), np.mean(an ** 2, axis=(1, 2, 3)), rtol=1e-6)
    huber = np.mean(np.sqrt(an ** 2 + 0.01) - 0.1, axis=(1, 2, 3))
    np.testing.assert_allclose(consistency.distance(a, b, "huber", 0.1), huber, rtol=1e-5)
    with pytest.raises(ValueError, match="loss_type must be 'l2' or 'huber', got 'l1'"):
        consistency.distance(a, b, "l1", 0.1)


def test_snr_timestep_weight_is_epsilon_scale_capped_at_one():
    abar = jnp.asarray([0.99, 0.5, 0.2, 0.0047])  # SNR 99, 1, 0.25, ~0.0047 (SD's t = 999)
    np.testing.assert_allclose(consistency.timestep_weight(abar, "uniform", "huber"), 1.0)
    np.testing.assert_allclose(consistency.timestep_weight(abar, "snr", "l2"),
                               [1.0, 1.0, 0.25, 0.0047 / 0.9953], rtol=1e-5)
    np.testing.assert_allclose(consistency.timestep_weight(abar, "snr", "huber"),
                               [1.0, 1.0, 0.5, np.sqrt(0.0047 / 0.9953)], rtol=1e-5)
    with pytest.raises(ValueError, match="timestep_weighting must be one of .* got 'min_snr'"):
        consistency.timestep_weight(abar, "min_snr", "l2")


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------


def test_ema_update_is_exact_on_a_pytree():
    rng = np.random.default_rng(0)
    tree = lambda: {"a": {"kernel": rng.standard_normal((3, 4)).astype(np.float32)},
                    "b": [rng.standard_normal(5).astype(np.float32), rng.standard_normal(()).astype(np.float32)]}
    target, params = tree(), tree()
    for decay in (0.95, 0.0, 1.0):
        out = ema_update(target, params, decay)
        assert jax.tree.structure(out) == jax.tree.structure(target)
        for o, t, p in zip(jax.tree.leaves(out), jax.tree.leaves(target), jax.tree.leaves(params)):
            assert o.dtype == np.float32
            np.testing.assert_allclose(o, np.float32(decay) * t + np.float32(1 - decay) * p, rtol=1e-7, atol=1e-7)
    np.testing.assert_array_equal(jax.tree.leaves(ema_update(target, params, 1.0))[0], target["a"]["kernel"])
    np.testing.assert_array_equal(jax.tree.leaves(ema_update(target, params, 0.0))[0], params["a"]["kernel"])
    # no gradient reaches the online params through the EMA
    g = jax.grad(lambda p: jnp.sum(ema_update(target, p, 0.5)["a"]["kernel"]))(params)
    assert not np.any(np.asarray(g["a"]["kernel"]))


# ---------------------------------------------------------------------------------------------
# Diffusion loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction", "sample"])
def test_diffusion_loss_targets(pred_type):
    schedule = schedules.NoiseSchedule(prediction_type=pred_type)
    loss_fn = diffusion.make_diffusion_loss(student_fn, schedule)
    batch, rng = _batch(2), jax.random.key(2)
    loss, per = loss_fn(PARAMS, None, None, batch, rng)
    rng_t, rng_eps = jax.random.split(rng)
    t = np.asarray(jax.random.randint(rng_t, (B,), 0, 1000))
    eps = np.asarray(jax.random.normal(rng_eps, (B, H, W, C), jnp.float32), np.float64)
    z = batch["latents"].astype(np.float64)
    a = np_alphas_cumprod()[t][:, None, None, None]
    z_t = np.sqrt(a) * z + np.sqrt(1 - a) * eps
    y = {"epsilon": eps, "v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * z, "sample": z}[pred_type]
    p64 = {k: v.astype(np.float64) for k, v in PARAMS.items()}
    out = _net(np, p64, z_t, t.astype(np.float64), batch["prompt_embeds"].astype(np.float64), None)
    ref = np.mean((out - y) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(per, ref, rtol=TOL)
    assert abs(float(loss) - ref.mean()) <= TOL * ref.mean()
    # the v target is consistent with the (x0, eps) inversion used by the samplers
    x0, e = schedules.predict_x0_eps(jnp.asarray(y, jnp.float32), jnp.asarray(z_t, jnp.float32), a, pred_type)
    np.testing.assert_allclose(x0, z, atol=2e-4)
    np.testing.assert_allclose(e, eps, atol=2e-4)


def test_diffusion_target_rejects_unknown_type():
    with pytest.raises(ValueError, match="prediction_type must be epsilon, v_prediction or sample, got 'x0'"):
        diffusion.diffusion_target(jnp.zeros(1), jnp.zeros(1), jnp.ones(1), "x0")


# ---------------------------------------------------------------------------------------------
# Guidance distillation into the student's parameterisation (method 'guided')
# ---------------------------------------------------------------------------------------------


def np_guidance_loss(params, teacher, batch, rng, cfg, pred_type, student_pred, T=1000):
    """Meng et al. 2023, stage one, in float64: t ~ U{0..T-1}, z_t by forward diffusion, the
    teacher's CFG x0 / eps at w, the student's output regressed onto them in its own type."""
    f64 = lambda tree: {k: np.asarray(v, np.float64) for k, v in tree.items()}
    params, teacher = f64(params), f64(teacher)
    z, c, c_u = (np.asarray(batch[k], np.float64) for k in ("latents", "prompt_embeds", "uncond_embeds"))
    abar = np_alphas_cumprod(T)
    rng_t, rng_eps, rng_w = jax.random.split(rng, 3)
    t = np.asarray(jax.random.randint(rng_t, (B,), 0, T))
    eps = np.asarray(jax.random.normal(rng_eps, (B, H, W, C), jnp.float32), np.float64)
    w = np.asarray(jax.random.uniform(rng_w, (B,), jnp.float32, cfg.w_min, cfg.w_max), np.float64)
    a = abar[t][:, None, None, None]
    z_t = np.sqrt(a) * z + np.sqrt(1 - a) * eps
    tf = t.astype(np.float64)
    x0_c, e_c = np_x0_eps(_net(np, teacher, z_t, tf, c, None), z_t, a, pred_type)
    x0_u, e_u = np_x0_eps(_net(np, teacher, z_t, tf, c_u, None), z_t, a, pred_type)
    wb = w[:, None, None, None]
    x0, e = x0_c + wb * (x0_c - x0_u), e_c + wb * (e_c - e_u)
    y = {"epsilon": e, "sample": x0, "v_prediction": np.sqrt(a) * e - np.sqrt(1 - a) * x0}[student_pred]
    out = _net(np, params, z_t, tf, c, np_w_embedding(w, cfg.w_embed_dim))
    per = np.mean((out - y) ** 2, axis=(1, 2, 3))
    return per.mean(), per


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("teacher_pred,student", [("epsilon", "v_prediction"), ("epsilon", "sample"),
                                                  ("epsilon", ""), ("v_prediction", "epsilon")])
def test_guidance_loss_equals_numpy(teacher_pred, student, seed):
    cfg = ConsistencyConfig(w_embed_dim=E, student_prediction=student)
    loss_fn = consistency.make_guidance_loss(student_fn, teacher_fn, schedules.NoiseSchedule(
        prediction_type=teacher_pred), cfg)
    rng, batch = jax.random.key(seed), _batch(seed)
    loss, per = loss_fn(PARAMS, None, FROZEN, batch, rng)
    ref, ref_per = np_guidance_loss(PARAMS, TEACHER, batch, rng, cfg, teacher_pred, student or teacher_pred)
    np.testing.assert_allclose(np.asarray(per, np.float64), ref_per, rtol=TOL)
    assert abs(float(loss) - ref) <= TOL * abs(ref)


def test_guidance_loss_is_zero_at_the_teacher_read_in_its_own_type():
    """The fixed point: a student that outputs the teacher's CFG prediction converted to its own
    type has zero loss and zero gradient (checked with a student that wraps the teacher)."""
    cfg = ConsistencyConfig(w_embed_dim=E, student_prediction="v_prediction", w_min=2.0, w_max=8.0)
    abar = jnp.asarray(schedules.NoiseSchedule().alphas_cumprod, jnp.float32)

    def wrapped(params, frozen, z, t, text, w_emb, added):  # w recovered from the batch's draw below
        both = jnp.concatenate([text, BATCH["uncond_embeds"]])
        out = _net(jnp, frozen["teacher"], jnp.concatenate([z, z]), jnp.concatenate([t, t]), both, None)
        a = abar[t][:, None, None, None]
        x0_c, e_c = schedules.predict_x0_eps(out[:B], z, a, "epsilon")
        x0_u, e_u = schedules.predict_x0_eps(out[B:], z, a, "epsilon")
        w = W[:, None, None, None]
        x0, e = x0_c + w * (x0_c - x0_u), e_c + w * (e_c - e_u)
        return params["s"] * (jnp.sqrt(a) * e - jnp.sqrt(1 - a) * x0)

    BATCH = _batch(3)
    rng = jax.random.key(3)
    W = jax.random.uniform(jax.random.split(rng, 3)[2], (B,), jnp.float32, 2.0, 8.0)
    loss_fn = consistency.make_guidance_loss(wrapped, teacher_fn, schedules.NoiseSchedule(), cfg)
    loss, grad = jax.value_and_grad(lambda p: loss_fn(p, None, FROZEN, BATCH, rng)[0])({"s": jnp.float32(1.0)})
    off = loss_fn({"s": jnp.float32(1.1)}, None, FROZEN, BATCH, rng)[0]
    assert float(loss) < 1e-10 and abs(float(grad["s"])) < 1e-6 and float(off) > 1e-3
