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


def test_lcd_brings_one_step_output_to_the_ddim_chain_endpoint():
    schedule, abar, scale0, shift0 = _setup()
    teacher_params = {"scale": scale0, "shift": shift0}
    teacher_fn = lambda _, frozen, z, t, text, w, added: _affine(teacher_params, z, t)
    student_fn = lambda p, frozen, z, t, text, w, added: _affine(p, z, t)
    cfg = ConsistencyConfig(num_ddim_timesteps=50, w_min=0.0, w_max=0.0, w_embed_dim=None,
                            loss_type="l2")
    loss_fn = make_consistency_loss(student_fn, teacher_fn, schedule, cfg)

    # The chain's endpoint from z at t = 999: DDIM with the exact teacher down the grid to t = 0.
    grid = ddim_grid(schedule.num_train_timesteps, cfg.num_ddim_timesteps)
    k = schedule.num_train_timesteps // cfg.num_ddim_timesteps
    z_T = jax.random.normal(jax.random.PRNGKey(1), (512,) + SHAPE)
    z = z_T
    for t in grid[::-1]:
        tt = jnp.full((z.shape[0],), t)
        x0, eps = schedules.predict_x0_eps(_affine(teacher_params, z, tt), z, abar[t], "epsilon")
        z = schedules.ddim_step(z, eps, x0, abar[t], abar[max(t - k, 0)])
    endpoint = z

    def one_step(params):  # f_theta(z_T, 999) = c_skip z + c_out x0
        t = jnp.full((z_T.shape[0],), grid[-1])
        x0, _ = schedules.predict_x0_eps(_affine(params, z_T, t), z_T, abar[grid[-1]], "epsilon")
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
    err0 = float(jnp.sqrt(jnp.mean((one_step(params) - endpoint) ** 2)))
    errs = []
    for i in range(3000):
        params, target, opt, _ = step(params, target, opt, jax.random.PRNGKey(100 + i))
        if i % 500 == 499:
            errs.append(float(jnp.sqrt(jnp.mean((one_step(target) - endpoint) ** 2))))
    print("one-step RMS error to the chain endpoint:", err0, errs)
    assert err0 > 0.2                    # the teacher's one-step x0 is the posterior mean
    assert errs[-1] < 0.1 * err0, (err0, errs)


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
        a0 = _chain_endpoint(teacher_params, abar, grid, k, jnp.zeros((1,) + SHAPE), n)[0, 0, 0, 0]
        a1 = _chain_endpoint(teacher_params, abar, grid, k, jnp.ones((1,) + SHAPE), n)[0, 0, 0, 0]
        A, B = a1 - a0, a0
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
