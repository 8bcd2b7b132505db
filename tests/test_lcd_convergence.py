"""LCD converges to the consistency function of the teacher's ODE where that function is known.

For Gaussian data x0 ~ N(mu, s^2) the ideal epsilon-predictor is linear in z_t, so the teacher is
exact and every DDIM step is linear: the consistency function of the teacher's N-step DDIM chain
(the grid the loss uses, skipping step k) is computed in closed form by running the chain. A
student whose epsilon-prediction is a per-timestep affine map of z_t can represent it exactly.
Started from the teacher (as LCD starts), training with make_consistency_loss and the EMA target
must bring the student's one-step output at t = 999 to the chain's endpoint. This checks the loss
end to end (grid, DDIM solver, boundary scalings, target network) in a case with a known answer.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcm_jax import schedules
from lcm_jax.losses.consistency import (ConsistencyConfig, ddim_grid, ema_update, make_consistency_loss,
                                         make_endpoint_error)

MU, S = 0.5, 0.3
SHAPE = (2, 2, 1)


def _setup():
    schedule = schedules.NoiseSchedule()
    abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    var = abar * S ** 2 + 1.0 - abar
    # Ideal eps-prediction for Gaussian data: E[eps | z_t] = sqrt(1-a) (z_t - sqrt(a) mu) / var.
    scale0 = jnp.sqrt(1.0 - abar) / var
    shift0 = -scale0 * jnp.sqrt(abar) * MU
    return schedule, abar, scale0, shift0


def _affine(params, z, t):
    return params["scale"][t][:, None, None, None] * z + params["shift"][t][:, None, None, None]


@pytest.mark.parametrize("coarse", [0, 10])
def test_lcd_brings_one_step_output_to_the_ddim_chain_endpoint(coarse):
    """coarse=10: mixed skipping steps, half the hops k = 100 on the 10-step grid. Its fixed point
    (_mixed_fixed_point) blends the two chains where they meet; the student must reach it."""
    schedule, abar, scale0, shift0 = _setup()
    teacher_params = {"scale": scale0, "shift": shift0}
    teacher_fn = lambda _, frozen, z, t, text, w, added: _affine(teacher_params, z, t)
    student_fn = lambda p, frozen, z, t, text, w, added: _affine(p, z, t)
    cfg = ConsistencyConfig(num_ddim_timesteps=50, w_min=0.0, w_max=0.0, w_embed_dim=None,
                            loss_type="l2", coarse_ddim_timesteps=coarse)
    loss_fn = make_consistency_loss(student_fn, teacher_fn, schedule, cfg)

    # The chains' endpoints from z at t = 999: DDIM with the exact teacher down each grid to t = 0.
    T = schedule.num_train_timesteps
    z_T = jax.random.normal(jax.random.PRNGKey(1), (512,) + SHAPE)
    if coarse:
        a, b = _mixed_fixed_point(teacher_params, abar, T, 50, coarse, cfg.coarse_fraction)
        endpoints = [a * z_T + b]
    else:
        endpoints = [_chain_endpoint(teacher_params, abar, ddim_grid(T, 50), T // 50, z_T, 49)]

    def one_step(params):  # f_theta(z_T, 999) = c_skip z + c_out x0
        t = jnp.full((z_T.shape[0],), 999)
        x0, _ = schedules.predict_x0_eps(_affine(params, z_T, t), z_T, abar[999], "epsilon")
        c_skip, c_out = schedules.scalings_for_boundary_conditions(t)
        return c_skip[:, None, None, None] * z_T + c_out[:, None, None, None] * x0

    tx = optax.adam(3e-3)
    b = 256
    text = jnp.zeros((b, 1, 1))
    frozen = None

    @jax.jit
    def step(params, target, opt, key):
        k_data, k_loss = jax.random.split(key)
        x = MU + S * jax.random.normal(k_data, (b,) + SHAPE)
        batch = {"latents": x, "prompt_embeds": text, "uncond_embeds": text}
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, target, frozen, batch, k_loss)[0])(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        return params, ema_update(target, params, 0.95), opt, loss

    params = dict(teacher_params)
    target, opt = params, tx.init(params)
    rms = lambda p, endpoint: float(jnp.sqrt(jnp.mean((one_step(p) - endpoint) ** 2)))
    err0 = rms(params, endpoints[0])
    errs = []
    for i in range(3000):
        params, target, opt, _ = step(params, target, opt, jax.random.PRNGKey(100 + i))
        if i % 500 == 499:
            errs.append([rms(target, e) for e in endpoints])
    print("one-step RMS error to the chain endpoints:", err0, errs)
    assert err0 > 0.2                    # the teacher's one-step x0 is the posterior mean
    assert max(errs[-1]) < 0.1 * err0, (err0, errs)


def _affine_coefficients(fn):
    """(a, b) of an elementwise affine map z -> a z + b of the latent."""
    b = fn(jnp.zeros((1,) + SHAPE))[0, 0, 0, 0]
    return fn(jnp.ones((1,) + SHAPE))[0, 0, 0, 0] - b, b


def _mixed_fixed_point(teacher_params, abar, T, n, n_c, p):
    """The consistency function mixed skipping steps converge to, at t = 999, as (a, b) with
    f(z) = a z + b. Its L2 loss at a timestep t is minimised by the mean of its hops' targets
    f(Psi(z, t -> t - k)) weighted by how often each hop starts at t: (1 - p) / n for the fine hop,
    p / n_c for the coarse one where t is on the coarse grid. Every map is affine here, so f is
    built up the grid from f(., 0) = z, one timestep at a time."""
    k, k_c = T // n, T // n_c
    f = {0: (1.0, 0.0)}

    def hop(t, s):  # f(., s) after the exact teacher's DDIM step t -> s (a chain of one step)
        a, b = _affine_coefficients(lambda z: _chain_endpoint(teacher_params, abar, [t], t - s, z, 0))
        return f[s][0] * a, f[s][0] * b + f[s][1]

    for t in ddim_grid(T, n).tolist():
        targets = [((1 - p) / n, hop(t, max(t - k, 0)))]
        if (t + 1) % k_c == 0:
            targets.append((p / n_c, hop(t, max(t - k_c, 0))))
        total = sum(w for w, _ in targets)
        f[t] = tuple(sum(w * ab[i] for w, ab in targets) / total for i in (0, 1))
    return f[T - 1]


def _chain_endpoint(teacher_params, abar, grid, k, z, n_start):
    """The teacher's DDIM chain on the skipping grid from grid[n_start] down to t = 0."""
    for t in grid[:n_start + 1][::-1]:
        tt = jnp.full((z.shape[0],), t)
        x0, eps = schedules.predict_x0_eps(_affine(teacher_params, z, tt), z, abar[t], "epsilon")
        z = schedules.ddim_step(z, eps, x0, abar[t], abar[max(t - k, 0)])
    return z


def test_endpoint_error_matches_the_chain_and_vanishes_for_the_consistency_function():
    schedule, abar, scale0, shift0 = _setup()
    teacher_params = {"scale": scale0, "shift": shift0}
    teacher_fn = lambda _, frozen, z, t, text, w, added: _affine(teacher_params, z, t)
    student_fn = lambda p, frozen, z, t, text, w, added: _affine(p, z, t)
    cfg = ConsistencyConfig(num_ddim_timesteps=50, w_min=0.0, w_max=0.0, w_embed_dim=None)
    grid = ddim_grid(schedule.num_train_timesteps, cfg.num_ddim_timesteps)
    k = schedule.num_train_timesteps // cfg.num_ddim_timesteps
    starts = (999, 599, 199, 19)
    endpoint_error = jax.jit(make_endpoint_error(student_fn, teacher_fn, schedule, cfg, starts))
    b = 64
    x = MU + S * jax.random.normal(jax.random.PRNGKey(3), (b,) + SHAPE)
    batch = {"latents": x, "prompt_embeds": jnp.zeros((b, 1, 1)), "uncond_embeds": jnp.zeros((b, 1, 1))}
    rng = jax.random.PRNGKey(4)
    got = np.asarray(endpoint_error(teacher_params, None, batch, 3.0, rng))

    # Reference: the same noise, the chain run step by step here, the teacher as the student.
    eps = jax.random.normal(rng, x.shape)
    exact = {"scale": scale0, "shift": shift0}
    want = []
    for t in starts:
        n = int(np.searchsorted(grid, t))
        z_t = jnp.sqrt(abar[t]) * x + jnp.sqrt(1 - abar[t]) * eps
        end = _chain_endpoint(teacher_params, abar, grid, k, z_t, n)
        tt = jnp.full((b,), t)
        x0, _ = schedules.predict_x0_eps(_affine(teacher_params, z_t, tt), z_t, abar[t], "epsilon")
        c_skip, c_out = schedules.scalings_for_boundary_conditions(tt)
        want.append(float(jnp.mean((c_skip[0] * z_t + c_out[0] * x0 - end) ** 2)))
        # The chain is affine, endpoint = A z_t + B: the student that outputs exactly that at t.
        A, B = _affine_coefficients(lambda z: _chain_endpoint(teacher_params, abar, grid, k, z, n))
        ra, rs, cs, co = jnp.sqrt(abar[t]), jnp.sqrt(1 - abar[t]), c_skip[0], c_out[0]
        exact["scale"] = exact["scale"].at[t].set((1 - (A - cs) * ra / co) / rs)
        exact["shift"] = exact["shift"].at[t].set(-B * ra / (co * rs))
    print("endpoint MSE, teacher as student:", got, "reference:", want)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got[0] > 0.03 and got[0] > 5 * got[-1]   # one step from t = 999 is far from the endpoint
    solved = np.asarray(endpoint_error(exact, None, batch, 3.0, rng))
    print("endpoint MSE, the chain's consistency function:", solved)
    assert np.all(solved < 1e-6 * np.maximum(got, 1e-3)), solved


def test_teacher_chain_endpoint_is_the_chain():
    """consistency.teacher_chain_endpoint (the oracle sampler's f) against the chain run step by
    step here; CFG with identical conditional and unconditional passes leaves it unchanged."""
    from lcm_jax.losses.consistency import teacher_chain_endpoint

    schedule, abar, scale0, shift0 = _setup()
    teacher_params = {"scale": scale0, "shift": shift0}
    teacher_fn = lambda _, frozen, z, t, text, w, added: _affine(teacher_params, z, t)
    grid = ddim_grid(schedule.num_train_timesteps, 50)
    z = jax.random.normal(jax.random.PRNGKey(7), (8,) + SHAPE)
    batch = {"prompt_embeds": jnp.zeros((8, 1, 1)), "uncond_embeds": jnp.zeros((8, 1, 1))}
    for t in (999, 499, 19):
        got = teacher_chain_endpoint(teacher_fn, None, batch, z, t, 4.0, schedule, 50)
        want = _chain_endpoint(teacher_params, abar, grid, 20, z, int(np.searchsorted(grid, t)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(got - z).max()) > 1e-3  # one hop from t = 19 still moves z
    import pytest
    with pytest.raises(ValueError, match="skipping grid"):
        teacher_chain_endpoint(teacher_fn, None, batch, z, 500, 4.0, schedule, 50)


# ---------------------------------------------------------------------------------------------
# TCD and PCM: the semi-linear consistency function f(z_t, t, s) = sqrt(abar_s) x0 + sqrt(1-abar_s) eps
# ---------------------------------------------------------------------------------------------


def _semi_linear(p, q, a, t, s):
    """(A, B) of f(z, t, s) = A z + B for the affine eps-predictor eps = p[t] z + q[t]."""
    c = np.sqrt(1 - a[s]) - np.sqrt(a[s] * (1 - a[t]) / a[t])
    return np.sqrt(a[s] / a[t]) + c * p[t], c * q[t]


def _np_chain(p, q, a, g, t, s):
    """(A, B) of the teacher's DDIM chain on the extended grid g from t down to s."""
    A, B, j = 1.0, 0.0, int(np.searchsorted(g, t))
    while g[j] > s:
        al, be = _semi_linear(p, q, a, g[j], g[j - 1])
        A, B, j = al * A, al * B + be, j - 1
    return A, B


def _np_fixed_point(method, n_grid, phases, a, p0, q0):
    """The stationary student of the l2 loss (target = the student), in float64: grid index n
    (t = g[n + 1], t_n = g[n]) depends only on the indices below it, so (p[t], q[t]) is the least-
    squares fit, over z_t ~ N(sqrt(abar_t) MU, abar_t S^2 + 1 - abar_t) and the loss's s-draw
    (TCD: s = g[m], m uniform in 0..n; PCM: the phase's lower edge), of f(z_t, t, s) to
    f(teacher's DDIM step of z_t, t_n, s)."""
    from lcm_jax.losses.consistency import extended_grid
    g, edges = extended_grid(1000, n_grid), schedules.pcm_edges(n_grid, phases)
    p, q = p0.copy(), q0.copy()
    for n in range(n_grid):
        t, te = g[n + 1], g[n]
        draws = [(m, 1 / (n + 1)) for m in range(n + 1)] if method == "tcd" else [(edges[edges <= n].max(), 1.0)]
        al, be = _semi_linear(p0, q0, a, t, te)        # the teacher's step t -> t_n
        mu, v = np.sqrt(a[t]) * MU, a[t] * S ** 2 + 1 - a[t]
        rows, rhs = [], []
        for m, w in draws:
            s = g[m]
            At, Bt = _semi_linear(p, q, a, te, s)      # the target f(., t_n, s) composed with it
            c = np.sqrt(1 - a[s]) - np.sqrt(a[s] * (1 - a[t]) / a[t])
            d, e = np.sqrt(a[s] / a[t]) - At * al, -(At * be + Bt)
            rows += [np.sqrt(w) * np.array([c * mu, c]), np.sqrt(w * v) * np.array([c, 0.0])]
            rhs += [-np.sqrt(w) * (d * mu + e), -np.sqrt(w * v) * d]
        p[t], q[t] = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return p, q


def _train_semi_linear(method, n_grid, phases, steps):
    """Trains the affine student from the teacher with make_consistency_loss (l2, EMA 0.95)."""
    schedule, abar, scale0, shift0 = _setup()
    teacher_params = {"scale": scale0, "shift": shift0}
    cfg = ConsistencyConfig(num_ddim_timesteps=n_grid, w_min=0.0, w_max=0.0, w_embed_dim=None,
                            loss_type="l2", method=method, pcm_phases=phases)
    target = _fit(cfg, schedule, teacher_params, dict(teacher_params), steps)
    return {k: np.asarray(v, np.float64) for k, v in target.items()}


def _fit(cfg, schedule, teacher_params, params, steps):
    """`steps` Adam steps (lr 3e-3, batch 256) of make_consistency_loss on the affine student from
    the affine teacher over the Gaussian data; returns the EMA target (decay 0.95)."""
    teacher_fn = lambda _, frozen, z, t, text, w, added: _affine(teacher_params, z, t)
    student_fn = lambda p, frozen, z, t, text, w, added: _affine(p, z, t)
    loss_fn = make_consistency_loss(student_fn, teacher_fn, schedule, cfg)
    tx, b = optax.adam(3e-3), 256
    text = jnp.zeros((b, 1, 1))

    @jax.jit
    def step(params, target, opt, key):
        k_data, k_loss = jax.random.split(key)
        batch = {"latents": MU + S * jax.random.normal(k_data, (b,) + SHAPE), "prompt_embeds": text,
                 "uncond_embeds": text}
        grads = jax.grad(lambda p: loss_fn(p, target, None, batch, k_loss)[0])(params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        return params, ema_update(target, params, 0.95), opt

    target, opt = params, tx.init(params)
    for i in range(steps):
        params, target, opt = step(params, target, opt, jax.random.PRNGKey(100 + i))
    return target


def _np_teacher():
    """abar and the exact teacher's eps = p z + q per timestep (the Gaussian data's), in float64."""
    a = schedules.NoiseSchedule().alphas_cumprod.astype(np.float64)
    p0 = np.sqrt(1 - a) / (a * S ** 2 + 1 - a)
    return a, p0, -p0 * np.sqrt(a) * MU


def _rms_to(p, q, pf, qf, a, ts):
    """RMS over z_t (its Gaussian marginal) and the timesteps ts of the eps difference."""
    var = a[ts] * S ** 2 + 1 - a[ts]
    dp, dq = p[ts] - pf[ts], q[ts] - qf[ts]
    return float(np.sqrt(np.mean(dp ** 2 * var + (dp * np.sqrt(a[ts]) * MU + dq) ** 2)))


def test_pcm_converges_to_the_teacher_chain_between_phase_edges():
    """PCM, N = 10, M = 2: each t maps to one s (its phase's lower edge), so the fixed point is the
    teacher's DDIM chain from t to that edge exactly, and training reaches it."""
    from lcm_jax.losses.consistency import extended_grid
    a, p0, q0 = _np_teacher()
    pf, qf = _np_fixed_point("pcm", 10, 2, a, p0, q0)
    g = extended_grid(1000, 10)
    for t, edge in ((999, 499), (899, 499), (599, 499), (499, 0), (99, 0)):
        np.testing.assert_allclose(_semi_linear(pf, qf, a, t, edge), _np_chain(p0, q0, a, g, t, edge),
                                   rtol=1e-10, atol=1e-12)
    trained = _train_semi_linear("pcm", 10, 2, 600)
    err0 = _rms_to(p0, q0, pf, qf, a, g[1:])
    err = _rms_to(trained["scale"], trained["shift"], pf, qf, a, g[1:])
    print("PCM eps RMS to the fixed point: teacher", err0, "trained", err)
    assert err0 > 0.01 and err < 1e-3 * err0


def test_tcd_converges_to_its_fixed_point_closer_to_the_chain_than_the_teacher():
    """TCD, N = 10: the student's eps does not see s, so no student is the chain for every s < t;
    the fixed point is the least-squares one over the s-draw (float64 here). Training reaches it,
    and its one-step map 999 -> 0 is nearer the teacher's chain than the teacher's one DDIM step;
    from the grid's first timestep (s = 0 only) it is the teacher's step, which is the chain."""
    from lcm_jax.losses.consistency import extended_grid
    a, p0, q0 = _np_teacher()
    pf, qf = _np_fixed_point("tcd", 10, 1, a, p0, q0)
    g = extended_grid(1000, 10)
    chain = np.array(_np_chain(p0, q0, a, g, 999, 0))
    fixed, teacher = np.array(_semi_linear(pf, qf, a, 999, 0)), np.array(_semi_linear(p0, q0, a, 999, 0))
    print("TCD 999 -> 0 (A, B): chain", chain, "fixed point", fixed, "teacher", teacher)
    assert np.abs(fixed - chain)[0] < 0.5 * np.abs(teacher - chain)[0]
    np.testing.assert_allclose(_semi_linear(pf, qf, a, 99, 0), _np_chain(p0, q0, a, g, 99, 0), rtol=1e-10)
    trained = _train_semi_linear("tcd", 10, 1, 600)
    err0 = _rms_to(p0, q0, pf, qf, a, g[1:])
    err = _rms_to(trained["scale"], trained["shift"], pf, qf, a, g[1:])
    print("TCD eps RMS to the fixed point: teacher", err0, "trained", err)
    assert err0 > 0.01 and err < 0.05 * err0


def _teacher_as(student, schedule, scale0, shift0):
    """The affine epsilon teacher eps = p z + q read as an x0 ('sample') or v student, in float64."""
    a = schedule.alphas_cumprod.astype(np.float64)
    p0, q0 = np.asarray(scale0, np.float64), np.asarray(shift0, np.float64)
    ra, rs = np.sqrt(a), np.sqrt(1 - a)
    if student == "sample":   # x0 = (z - rs eps) / ra
        return {"scale": (1 - rs * p0) / ra, "shift": -rs * q0 / ra}
    return {"scale": ra * p0 - rs * (1 - rs * p0) / ra, "shift": ra * q0 + rs * rs * q0 / ra}  # v = ra eps - rs x0


@pytest.mark.parametrize("student,sampling", [("sample", "sampler"), ("v_prediction", "uniform")])
def test_lcd_x0_and_v_students_converge_to_the_chain_endpoint(student, sampling):
    """LCD, N = 10, a student whose affine output is read as x0 or v (started from the teacher's
    own x0 / v, converted in float64) and n drawn uniformly or sampler-weighted: the one-step
    output f(z_t, t) from every grid timestep reaches the teacher's DDIM chain endpoint."""
    from lcm_jax.losses.consistency import extended_grid
    schedule, abar, scale0, shift0 = _setup()
    init = _teacher_as(student, schedule, scale0, shift0)
    teacher_params = {"scale": scale0, "shift": shift0}
    cfg = ConsistencyConfig(num_ddim_timesteps=10, w_min=0.0, w_max=0.0, w_embed_dim=None, loss_type="l2",
                            student_prediction=student, timestep_sampling=sampling)

    g = extended_grid(1000, 10)
    z = jax.random.normal(jax.random.PRNGKey(1), (256,) + SHAPE)

    def error(params):  # RMS over z and every grid start of f(z, t) - the chain's endpoint
        errs = []
        for n in range(10):
            t = int(g[n + 1])
            tt = jnp.full((z.shape[0],), t)
            x0, _ = schedules.predict_x0_eps(_affine(params, z, tt), z, abar[t], student)
            c_skip, c_out = schedules.scalings_for_boundary_conditions(tt)
            one = c_skip[:, None, None, None] * z + c_out[:, None, None, None] * x0
            end = _chain_endpoint(teacher_params, abar, g[1:], 100, z, n)
            errs.append(float(jnp.mean((one - end) ** 2)))
        return float(np.sqrt(np.mean(errs)))

    params = {k: jnp.asarray(v, jnp.float32) for k, v in init.items()}
    err0 = error(params)
    err = error(_fit(cfg, schedule, teacher_params, params, 500))
    print(student, sampling, "one-step RMS to the chain endpoints:", err0, err)
    assert err0 > 0.05 and err < 0.1 * err0


@pytest.mark.parametrize("student", ["sample", "v_prediction"])
def test_guidance_distillation_puts_the_teacher_into_the_students_parameterisation(student):
    """method 'guided' (make_guidance_loss), from the epsilon teacher's weights read as x0 or v (the
    start that fails LCD): training brings the student's output to the teacher's own prediction
    in that type, its fixed point, converted in float64, at every timestep."""
    from lcm_jax.losses.consistency import make_guidance_loss

    schedule, abar, scale0, shift0 = _setup()
    fixed = _teacher_as(student, schedule, scale0, shift0)
    a = schedule.alphas_cumprod.astype(np.float64)
    ra = np.sqrt(a)
    teacher = {"scale": scale0, "shift": shift0}
    cfg = ConsistencyConfig(w_min=0.0, w_max=0.0, w_embed_dim=None, student_prediction=student)
    loss_fn = make_guidance_loss(lambda p, f, z, t, *_: _affine(p, z, t),
                                 lambda _, f, z, t, *__: _affine(teacher, z, t), schedule, cfg)
    tx, b = optax.adam(1e-2), 1024
    text = jnp.zeros((b, 1, 1))

    @jax.jit
    def step(params, opt, key):
        k_data, k_loss = jax.random.split(key)
        batch = {"latents": MU + S * jax.random.normal(k_data, (b,) + SHAPE), "prompt_embeds": text,
                 "uncond_embeds": text}
        grads = jax.grad(lambda p: loss_fn(p, None, None, batch, k_loss)[0])(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    params = dict(teacher)
    opt = tx.init(params)
    for i in range(1000):
        params, opt = step(params, opt, jax.random.PRNGKey(i))
    ts = np.arange(1000)
    var = a * S ** 2 + 1 - a    # z_t's marginal: RMS of the output difference over it

    def rms(p):
        dp, dq = np.asarray(p["scale"], np.float64) - fixed["scale"], np.asarray(p["shift"], np.float64) - fixed["shift"]
        return np.sqrt(dp ** 2 * var + (dp * ra * MU + dq) ** 2)[ts]

    err0, err = rms(teacher), rms(params)
    print(student, "output RMS to the fixed point: start", err0.mean(), "trained", err.mean(), err.max())
    assert err0.mean() > 0.3 and err.mean() < 1e-3 * err0.mean() and err.max() < 0.02 * err0.mean()
