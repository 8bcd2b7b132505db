"""Samplers step for step against the diffusers schedulers, on a toy model written twice."""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, TCDScheduler

from lcm_jax import sampling, schedules
from lcm_jax.schedules import NoiseSchedule

B, C, H, W = 2, 4, 8, 8
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
MIX = np.random.default_rng(1).standard_normal((C, C)).astype(np.float32) / 2


def toy_model_torch(x, t):
    """A fixed nonlinear function of (x, t), NCHW."""
    t = t.to(torch.float32).view(-1, 1, 1, 1)
    mixed = torch.einsum("bchw,cd->bdhw", x, torch.from_numpy(MIX))
    return torch.tanh(mixed * (1 + t / 1000)) + 0.5 * x * torch.cos(t / 300)


def toy_model_jax(x, t):
    """`toy_model_torch` in NHWC."""
    t = t.astype(jnp.float32).reshape(-1, 1, 1, 1)
    mixed = jnp.einsum("bhwc,cd->bhwd", x, MIX)
    return jnp.tanh(mixed * (1 + t / 1000)) + 0.5 * x * jnp.cos(t / 300)


def nchw(a):
    return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())


def nhwc(a):
    return a.numpy().transpose(0, 2, 3, 1)


def initial_latents(seed=0):
    return torch.randn((B, C, H, W), generator=torch.Generator().manual_seed(seed))


def run_diffusers(scheduler, latents, second_output, step_kwargs=None):
    """The diffusers sampling loop; per step (prev_sample, `second_output`) in NHWC."""
    x, prev, second = latents, [], []
    for t in scheduler.timesteps:
        out = toy_model_torch(x, t.expand(x.shape[0]))
        res = scheduler.step(out, t, x, **(step_kwargs or {}))
        x = res.prev_sample
        prev.append(nhwc(x))
        second.append(nhwc(scheduler.model_outputs[-1] if second_output == "x0_pred" else res[second_output]))
    return np.stack(prev), np.stack(second)


def torch_noises(seed, num_steps):
    """The noise diffusers' LCM/TCD steps draw from a generator seeded `seed`, NHWC; last unused."""
    g = torch.Generator().manual_seed(seed)
    draws = [nhwc(torch.randn((B, C, H, W), generator=g)) for _ in range(num_steps - 1)]
    return np.stack(draws + [np.zeros((B, H, W, C), np.float32)])


def assert_close(ours, theirs, tol=1e-6):
    err = np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def compare(sampler, schedule, timesteps, reference, latents, keys, **kwargs):
    """Run the jitted sampler with trajectory and compare each step to diffusers'."""
    fn = functools.partial(sampler, toy_model_jax, schedule=schedule, timesteps=timesteps,
                           return_trajectory=True, debug=True, **kwargs)
    x, traj = fn(jnp.asarray(nhwc(latents)))
    prev, second = reference
    assert_close(traj[keys[0]], prev)
    assert_close(traj[keys[1]], second)
    assert_close(x, prev[-1])


@pytest.mark.parametrize("prediction_type, num_steps, original_steps", [
    ("epsilon", 4, 50), ("v_prediction", 4, 50), ("sample", 4, 50), ("epsilon", 1, 50),
    ("v_prediction", 6, 100)])
def test_lcm_matches_diffusers(prediction_type, num_steps, original_steps):
    scheduler = LCMScheduler(**SD, prediction_type=prediction_type)
    scheduler.set_timesteps(num_steps, original_inference_steps=original_steps)
    latents = initial_latents()
    generator = torch.Generator().manual_seed(7)
    reference = run_diffusers(scheduler, latents, "denoised", dict(generator=generator))
    schedule = NoiseSchedule.from_scheduler_config(dict(scheduler.config))
    ts = schedules.lcm_timesteps(num_steps, original_steps)
    compare(sampling.lcm_sample, schedule, ts, reference, latents, ("prev_sample", "denoised"),
            noises=jnp.asarray(torch_noises(7, num_steps)))


@pytest.mark.parametrize("prediction_type, gamma", [("epsilon", 0.0), ("v_prediction", 0.0), ("epsilon", 0.3),
                                                    ("v_prediction", 0.3), ("epsilon", 1.0)])
def test_tcd_matches_diffusers(prediction_type, gamma):
    scheduler = TCDScheduler(**SD, prediction_type=prediction_type)
    scheduler.set_timesteps(timesteps=[999, 845, 665, 410, 20])
    latents = initial_latents(1)
    reference = run_diffusers(scheduler, latents, "pred_noised_sample",
                              dict(eta=gamma, generator=torch.Generator().manual_seed(3)))
    schedule = NoiseSchedule.from_scheduler_config(dict(scheduler.config))
    ts = schedules.tcd_timesteps(None, timesteps=[999, 845, 665, 410, 20])
    compare(sampling.tcd_sample, schedule, ts, reference, latents, ("prev_sample", "pred_noised_sample"),
            gamma=gamma, noises=jnp.asarray(torch_noises(3, len(ts))))


@pytest.mark.parametrize("prediction_type, spacing, offset, alpha_to_one, clip", [
    ("epsilon", "leading", 1, False, False), ("v_prediction", "leading", 1, False, False),
    ("epsilon", "trailing", 0, True, True), ("v_prediction", "linspace", 0, True, False)])
def test_ddim_matches_diffusers(prediction_type, spacing, offset, alpha_to_one, clip):
    scheduler = DDIMScheduler(**SD, prediction_type=prediction_type, timestep_spacing=spacing,
                              steps_offset=offset, set_alpha_to_one=alpha_to_one, clip_sample=clip,
                              clip_sample_range=4.0)  # clips, yet keeps the error metric's scale
    scheduler.set_timesteps(7)
    latents = initial_latents(2)
    reference = run_diffusers(scheduler, latents, "pred_original_sample")
    schedule = NoiseSchedule.from_scheduler_config(dict(scheduler.config))
    ts = schedules.ddim_timesteps(7, timestep_spacing=spacing, steps_offset=offset)
    compare(sampling.ddim_sample, schedule, ts, reference, latents, ("prev_sample", "pred_original_sample"))


@pytest.mark.parametrize("prediction_type, num_steps, solver_order, spacing", [
    ("epsilon", 8, 2, "linspace"), ("v_prediction", 8, 2, "linspace"), ("v_prediction", 2, 2, "leading"),
    ("epsilon", 1, 2, "linspace"), ("epsilon", 5, 1, "trailing")])
def test_dpm_solver_pp_matches_diffusers(prediction_type, num_steps, solver_order, spacing):
    scheduler = DPMSolverMultistepScheduler(**SD, prediction_type=prediction_type, solver_order=solver_order,
                                            timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    latents = initial_latents(3)
    reference = run_diffusers(scheduler, latents, "x0_pred")
    schedule = NoiseSchedule.from_scheduler_config(dict(scheduler.config))
    ts = schedules.dpm_timesteps(num_steps, timestep_spacing=spacing)
    compare(sampling.dpm_solver_pp_sample, schedule, ts, reference, latents, ("prev_sample", "x0_pred"),
            solver_order=solver_order)


SAMPLERS = {
    "lcm": functools.partial(sampling.lcm_sample, timesteps=schedules.lcm_timesteps(4)),
    "tcd": functools.partial(sampling.tcd_sample, timesteps=schedules.tcd_timesteps(4), gamma=0.3),
    "ddim": functools.partial(sampling.ddim_sample, timesteps=schedules.ddim_timesteps(5)),
    "dpm": functools.partial(sampling.dpm_solver_pp_sample, timesteps=schedules.dpm_timesteps(5)),
}
STOCHASTIC = {"lcm", "tcd"}  # given explicit noises here: see the rng test


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_jit_and_debug_agree_and_trace_model_once(name):
    calls = []

    def counting_model(x, t):
        calls.append(t.shape)
        return toy_model_jax(x, t)

    num_steps = len(SAMPLERS[name].keywords["timesteps"])
    noises = np.random.default_rng(0).standard_normal((num_steps, B, H, W, C), np.float32)
    extra = {"noises": jnp.asarray(noises)} if name in STOCHASTIC else {}
    run = functools.partial(SAMPLERS[name], counting_model, schedule=NoiseSchedule(), **extra)
    latents = jnp.asarray(nhwc(initial_latents()))
    lowered = jax.jit(run).lower(latents)
    assert calls == [(B,)], "model_fn must be traced once: the steps are one lax.scan"
    assert lowered.as_text().count("stablehlo.tanh") == 1, "the model must appear once in the program"
    jitted = lowered.compile()(latents)
    eager = run(latents, debug=True)
    assert len(calls) == 1 + num_steps
    assert_close(jitted, np.asarray(eager))


def test_lcm_rng_noise_is_fresh_per_step_and_seeded():
    latents = jnp.asarray(nhwc(initial_latents()))
    run = jax.jit(lambda key: sampling.lcm_sample(toy_model_jax, latents, NoiseSchedule(),
                                                  schedules.lcm_timesteps(4), key))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
    one_step = sampling.lcm_sample(toy_model_jax, latents, NoiseSchedule(), schedules.lcm_timesteps(1))
    assert one_step.shape == latents.shape  # a single step draws no noise: no rng needed


def test_cfg_model_fn_combines_one_concatenated_batch():
    emb = jnp.arange(2 * B, dtype=jnp.float32).reshape(2 * B, 1, 1, 1)  # rows [uncond; cond]
    batches = []

    def model_uncond_cond(x, t):
        batches.append(x.shape[0])
        return toy_model_jax(x, t) * emb

    x = jnp.asarray(nhwc(initial_latents()))
    t = jnp.full((B,), 500, jnp.int32)
    guided = sampling.cfg_model_fn(model_uncond_cond, 7.5)(x, t)
    eps_u, eps_c = toy_model_jax(x, t) * emb[:B], toy_model_jax(x, t) * emb[B:]
    assert batches == [2 * B]
    np.testing.assert_allclose(guided, eps_u + 7.5 * (eps_c - eps_u), rtol=1e-6)


def test_sampler_input_errors():
    latents = jnp.zeros((B, H, W, C))
    ts = schedules.lcm_timesteps(4)
    with pytest.raises(ValueError, match=r"noises must have shape \(4, 2, 8, 8, 4\)"):
        sampling.lcm_sample(toy_model_jax, latents, NoiseSchedule(), ts, noises=jnp.zeros((3, B, H, W, C)))
    with pytest.raises(ValueError, match="pass rng"):
        sampling.lcm_sample(toy_model_jax, latents, NoiseSchedule(), ts)
    with pytest.raises(ValueError, match="gamma must be in"):
        sampling.tcd_sample(toy_model_jax, latents, NoiseSchedule(), ts, jax.random.key(0), gamma=1.5)
    with pytest.raises(TypeError, match="timesteps must be concrete"):
        jax.jit(lambda t: sampling.ddim_sample(toy_model_jax, latents, NoiseSchedule(), t))(jnp.asarray(ts))


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lcm_jax import sampling, schedules
    assert jax.device_count() == 8
    data = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    rng = np.random.default_rng(0)
    mix, x = rng.standard_normal((4, 4), np.float32), rng.standard_normal((8, 8, 8, 4), np.float32)
    noises = rng.standard_normal((4, 8, 8, 8, 4), np.float32)
    emb = jnp.linspace(0.5, 1.5, 16).reshape(16, 1, 1, 1)  # [uncond; cond] rows
    def model(x, t):
        return jnp.tanh(jnp.einsum("bhwc,cd->bhwd", x, mix) * emb) * (1 + t[:, None, None, None] / 1e3)
    guided = sampling.cfg_model_fn(model, 4.0)
    schedule = schedules.NoiseSchedule()
    lcm = jax.jit(lambda x, n: sampling.lcm_sample(guided, x, schedule, schedules.lcm_timesteps(4), noises=n))
    dpm = jax.jit(lambda x: sampling.dpm_solver_pp_sample(guided, x, schedule, schedules.dpm_timesteps(4)))
    for name, run, args in [("lcm", lcm, (x, noises)), ("dpm", dpm, (x,))]:
        sharded = run(*(jax.device_put(a, NamedSharding(data.mesh, P(*([None] * (a.ndim - 4)), "data")))
                        for a in args))
        single = run(*args)
        assert sharded.sharding.is_equivalent_to(data, 4), (name, sharded.sharding)
        err = np.abs(np.asarray(sharded) - np.asarray(single)).max() / np.abs(np.asarray(single)).max()
        assert err < 1e-6, (name, err)
    print("OK")
""")


def test_samplers_run_sharded_over_data_axis():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Partial schedules (img2img, SDEdit) and the DPM-Solver++ options
# ---------------------------------------------------------------------------------------------


def _deterministic(flip: bool) -> torch.Tensor:
    """diffusers' scheduler-test tensors (dummy_sample_deter / dummy_noise_deter), (4, 3, 8, 8)."""
    n = 4 * 3 * 8 * 8
    values = torch.arange(n).flip(-1) if flip else torch.arange(n)
    return (values.reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def test_ddim_partial_schedule_steps_like_diffusers():
    """diffusers' DDIM test_full_loop_with_noise: the last 2 of 10 steps from a noised sample; the
    step size stays T // 10 (not T // 2)."""
    config = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                  clip_sample=True)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps[8:]
    sample = scheduler.add_noise(_deterministic(False), _deterministic(True), timesteps[:1])
    x0, noise = nhwc(_deterministic(False)), nhwc(_deterministic(True))
    for t in timesteps:
        sample = scheduler.step(sample * t / (t + 1), t, sample, 0.0).prev_sample

    schedule = NoiseSchedule.from_scheduler_config(config)
    ts = schedules.img2img_timesteps(schedules.ddim_timesteps(10), 0.2)
    np.testing.assert_array_equal(ts, timesteps.numpy())
    start = sampling.noised_latents("ddim", jnp.asarray(x0), jnp.asarray(noise), schedule, ts)
    def dummy_model(x, t):  # diffusers' scheduler-test model: sample * t / (t + 1)
        t = t[:, None, None, None]
        return x * t / (t + 1)

    ours = sampling.ddim_sample(dummy_model, start, schedule, ts, num_inference_steps=10)
    np.testing.assert_allclose(np.abs(np.asarray(ours)).sum(), sample.abs().sum().item(), rtol=1e-6)
    assert_close(ours, nhwc(sample))
    whole = sampling.ddim_sample(dummy_model, start, schedule, ts)  # as if the 2 steps were all
    assert abs(np.abs(np.asarray(whole)).sum() - sample.abs().sum().item()) > 1.0


def _run_dpm_diffusers(scheduler, latents, noises, start=0):
    """diffusers' loop over the schedule from index `start` (set_begin_index, as img2img)."""
    scheduler.set_begin_index(start)
    x, prev = latents, []
    for i, t in enumerate(scheduler.timesteps[start:]):
        kwargs = {} if noises is None else {"variance_noise": nchw(noises[i])}
        x = scheduler.step(toy_model_torch(x, t.expand(x.shape[0])), t, x, **kwargs).prev_sample
        prev.append(nhwc(x))
    return np.stack(prev)


@pytest.mark.parametrize("options, num_steps, start", [
    (dict(final_sigmas_type="sigma_min"), 6, 0),
    (dict(final_sigmas_type="sigma_min", lower_order_final=False), 6, 0),
    (dict(final_sigmas_type="sigma_min"), 16, 0),
    (dict(use_karras_sigmas=True), 7, 0),
    (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", prediction_type="v_prediction"), 5, 0),
    (dict(algorithm_type="sde-dpmsolver++"), 6, 0),
    (dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, final_sigmas_type="sigma_min"), 5, 0),
    (dict(), 10, 4),
    (dict(use_karras_sigmas=True), 8, 3),
])
def test_dpm_options_match_diffusers(options, num_steps, start):
    options = dict(options)
    prediction_type = options.pop("prediction_type", "epsilon")
    scheduler = DPMSolverMultistepScheduler(**SD, prediction_type=prediction_type, **options)
    scheduler.set_timesteps(num_steps)
    n_run = num_steps - start
    noises = (np.random.default_rng(5).standard_normal((n_run, B, H, W, C)).astype(np.float32)
              if options.get("algorithm_type") else None)
    latents = initial_latents(4)
    reference = _run_dpm_diffusers(scheduler, latents, noises, start)
    schedule = NoiseSchedule.from_scheduler_config(dict(scheduler.config))
    ts = schedules.sampler_timesteps("dpm", num_steps, dict(scheduler.config), 1000)[start:]
    np.testing.assert_array_equal(ts, scheduler.timesteps.numpy()[start:])
    x, traj = sampling.dpm_solver_pp_sample(
        toy_model_jax, jnp.asarray(nhwc(latents)), schedule, ts, num_inference_steps=num_steps,
        noises=None if noises is None else jnp.asarray(noises), return_trajectory=True, **options)
    assert_close(traj["prev_sample"], reference, tol=2e-6)


@pytest.mark.parametrize("sampler, options", [("ddim", {}), ("dpm", {}), ("dpm", {"use_karras_sigmas": True}),
                                              ("lcm", {})])
def test_noised_latents_equal_add_noise(sampler, options):
    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "lcm": LCMScheduler}[sampler]
    scheduler = cls(**SD, **options)
    scheduler.set_timesteps(10)
    start = 6
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    x0, noise = initial_latents(5), initial_latents(6)
    ref = scheduler.add_noise(x0, noise, scheduler.timesteps[start:start + 1])
    ts = scheduler.timesteps.numpy()[start:]
    ours = sampling.noised_latents(sampler, jnp.asarray(nhwc(x0)), jnp.asarray(nhwc(noise)),
                                   NoiseSchedule(**SD), ts, num_inference_steps=10, **options)
    assert_close(ours, nhwc(ref))


@pytest.mark.parametrize("kwargs, match", [
    (dict(algorithm_type="dpmsolver"), "algorithm_type 'dpmsolver' is not supported"),
    (dict(algorithm_type="sde-dpmsolver++"), "pass rng"),
    (dict(final_sigmas_type="last"), "final_sigmas_type 'last' is not supported"),
    (dict(num_inference_steps=2), "num_inference_steps=2 is shorter than the 4 timesteps"),
])
def test_dpm_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling.dpm_solver_pp_sample(toy_model_jax, jnp.zeros((B, H, W, C)), NoiseSchedule(),
                                      schedules.dpm_timesteps(4), **kwargs)
