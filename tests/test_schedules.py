"""Noise schedules and timesteps against the diffusers schedulers (PyTorch)."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, TCDScheduler

from lcm_jax import schedules
from lcm_jax.schedules import NoiseSchedule

SCHEDULES = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.02, num_train_timesteps=999),
]


@pytest.mark.parametrize("kwargs", SCHEDULES)
def test_alphas_cumprod_equal_diffusers(kwargs):
    ours = NoiseSchedule(**kwargs).alphas_cumprod
    theirs = LCMScheduler(**kwargs).alphas_cumprod.numpy()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def test_trained_betas_and_final_alpha():
    betas = np.linspace(1e-4, 2e-2, 1000)
    ours = NoiseSchedule(trained_betas=tuple(betas), set_alpha_to_one=False)
    theirs = DDIMScheduler(trained_betas=betas, set_alpha_to_one=False)
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy())
    assert ours.final_alpha_cumprod == theirs.final_alpha_cumprod.item()
    assert NoiseSchedule().final_alpha_cumprod == 1.0


def test_from_scheduler_config_reads_diffusers_configs():
    config = dict(DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                                prediction_type="v_prediction").config)
    config["_class_name"] = "DDIMScheduler"
    s = NoiseSchedule.from_scheduler_config(config)
    assert (s.beta_schedule, s.prediction_type, s.steps_offset, s.set_alpha_to_one, s.clip_sample) == \
        ("scaled_linear", "v_prediction", 1, False, True)
    assert NoiseSchedule.from_scheduler_config(dict(LCMScheduler().config)) == NoiseSchedule(
        timestep_spacing="leading")


@pytest.mark.parametrize("config, match", [
    (dict(beta_schedule="sigmoid"), "beta_schedule 'sigmoid' is not supported"),
    (dict(prediction_type="flow_prediction"), "prediction_type 'flow_prediction' is not supported"),
    (dict(thresholding=True), "thresholding=True, which lcm-jax does not implement"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True"),
])
def test_from_scheduler_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_scheduler_config(config)


@pytest.mark.parametrize("n, orig, strength", [(1, 50, 1.0), (2, 50, 1.0), (4, 50, 1.0), (8, 50, 1.0),
                                               (3, 7, 1.0), (50, 50, 1.0), (4, 100, 1.0), (5, 999, 1.0),
                                               (4, 50, 0.5), (4, 1000, 0.3)])
def test_lcm_timesteps_equal_diffusers(n, orig, strength):
    sched = LCMScheduler()
    sched.set_timesteps(n, original_inference_steps=orig, strength=strength)
    ours = schedules.lcm_timesteps(n, orig, strength=strength)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, sched.timesteps.numpy())


@pytest.mark.parametrize("custom, strength", [([999, 759, 499, 259], 1.0), ([999, 500, 3], 1.0),
                                              ([899, 600, 300, 100, 0], 0.6)])
def test_lcm_custom_timesteps_equal_diffusers(custom, strength):
    sched = LCMScheduler()
    sched.set_timesteps(timesteps=custom, strength=strength)
    ours = schedules.lcm_timesteps(None, timesteps=custom, strength=strength)
    np.testing.assert_array_equal(ours, sched.timesteps.numpy())


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_inference_steps=None), "exactly one of"),
    (dict(num_inference_steps=4, timesteps=[999, 499]), "exactly one of"),
    (dict(num_inference_steps=None, timesteps=[999, 999, 1]), "descending"),
    (dict(num_inference_steps=None, timesteps=[1000, 500]), "start below num_train_timesteps=1000"),
    (dict(num_inference_steps=60), "50 x 1.0 is smaller than num_inference_steps=60"),
    (dict(num_inference_steps=60, strength=1.5), "cannot exceed original_inference_steps=50"),
    (dict(num_inference_steps=4, original_inference_steps=2000), "cannot exceed num_train_timesteps"),
    (dict(num_inference_steps=30, strength=0.5), "smaller than num_inference_steps=30"),
])
def test_lcm_timesteps_errors_like_diffusers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.lcm_timesteps(**kwargs)
    kwargs = dict(kwargs)
    kwargs.setdefault("original_inference_steps", 50)
    with pytest.raises(ValueError):  # diffusers refuses the same input
        LCMScheduler().set_timesteps(**kwargs)


def test_lcm_timesteps_rejects_negative_custom():
    with pytest.raises(ValueError, match="non-negative"):
        schedules.lcm_timesteps(None, timesteps=[999, 499, -1])


@pytest.mark.parametrize("n, orig", [(1, None), (4, None), (8, None), (4, 50), (10, 100), (3, 1000)])
def test_tcd_timesteps_equal_diffusers(n, orig):
    sched = TCDScheduler()
    sched.set_timesteps(n, original_inference_steps=orig)
    np.testing.assert_array_equal(schedules.tcd_timesteps(n, orig), sched.timesteps.numpy())


def test_tcd_custom_timesteps_equal_diffusers():
    sched = TCDScheduler()
    sched.set_timesteps(timesteps=[999, 700, 20])
    ours = schedules.tcd_timesteps(None, timesteps=[999, 700, 20])
    np.testing.assert_array_equal(ours, sched.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n, offset", [(1, 0), (4, 1), (7, 0), (50, 1), (999, 0)])
def test_ddim_timesteps_equal_diffusers(spacing, n, offset):
    sched = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(n)
    ours = schedules.ddim_timesteps(n, timestep_spacing=spacing, steps_offset=offset)
    np.testing.assert_array_equal(ours, sched.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n, offset", [(1, 0), (4, 1), (7, 0), (25, 1)])
def test_dpm_timesteps_and_sigmas_equal_diffusers(spacing, n, offset):
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(n)
    ours = schedules.dpm_timesteps(n, timestep_spacing=spacing, steps_offset=offset)
    np.testing.assert_array_equal(ours, sched.timesteps.numpy())
    # Equal up to float32 rounding (numpy's interpolation vs torch's; an ulp apart on some CPUs).
    np.testing.assert_allclose(schedules.dpm_sigmas(NoiseSchedule(), ours), sched.sigmas.numpy(),
                               rtol=3e-7, atol=0)


def test_timestep_spacing_error():
    with pytest.raises(ValueError, match="timestep_spacing 'karras' is not supported"):
        schedules.ddim_timesteps(4, timestep_spacing="karras")


@pytest.mark.parametrize("scaling", [10.0, 1.0])
def test_scalings_equal_lcm_scheduler(scaling):
    sched = LCMScheduler(timestep_scaling=scaling)
    ts = np.array([999, 759, 499, 259, 19, 1, 0])
    c_skip, c_out = schedules.scalings_for_boundary_conditions(ts, timestep_scaling=scaling)
    for i, t in enumerate(ts):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert c_skip[i] == ref_skip.item() and c_out[i] == ref_out.item()
    jnp_skip, _ = schedules.scalings_for_boundary_conditions(__import__("jax").numpy.asarray(ts),
                                                             timestep_scaling=scaling)
    np.testing.assert_array_equal(np.asarray(jnp_skip), c_skip)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_eps_inverts_forward_process(prediction_type):
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
    abar = np.array([0.9, 0.05, 0.3], np.float32).reshape(3, 1, 1, 1)
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    x_t = a * x0 + s * eps
    output = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction_type]
    got_x0, got_eps = schedules.predict_x0_eps(output, x_t, abar, prediction_type)
    np.testing.assert_allclose(got_x0, x0, atol=1e-4)
    np.testing.assert_allclose(got_eps, eps, atol=1e-4)
    # DDIM from t to t keeps x_t; to abar=1 it returns x0.
    np.testing.assert_allclose(schedules.ddim_step(x_t, got_eps, got_x0, abar, abar), x_t, atol=1e-5)
    np.testing.assert_allclose(schedules.ddim_step(x_t, got_eps, got_x0, abar, 1.0), got_x0, atol=0)
    with pytest.raises(ValueError, match="prediction_type 'x' is not supported"):
        schedules.predict_x0_eps(output, x_t, abar, "x")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_output_for_x0_inverts_predict_x0_eps(prediction_type):
    rng = np.random.default_rng(0)
    x0, x_t = rng.normal(size=(2, 4, 4, 3)).astype(np.float32), rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    a = np.float32(0.3)
    out = schedules.output_for_x0(x0, x_t, a, prediction_type)
    back, _ = schedules.predict_x0_eps(out, x_t, a, prediction_type)
    np.testing.assert_allclose(back, x0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not supported"):
        schedules.output_for_x0(x0, x_t, a, "flow")


@pytest.mark.parametrize("kwargs", SCHEDULES[:3])
@pytest.mark.parametrize("n, final", [(4, "zero"), (9, "sigma_min"), (25, "sigma_min")])
def test_karras_and_final_sigmas_equal_diffusers(kwargs, n, final):
    sched = DPMSolverMultistepScheduler(**kwargs, use_karras_sigmas=True, final_sigmas_type=final)
    sched.set_timesteps(n)
    schedule = NoiseSchedule(**kwargs)
    ts = schedules.karras_timesteps(schedule, n)
    np.testing.assert_array_equal(ts, sched.timesteps.numpy())
    np.testing.assert_allclose(schedules.dpm_sigmas(schedule, ts, final, use_karras_sigmas=True),
                               sched.sigmas.numpy(), rtol=3e-7, atol=0)
    plain = DPMSolverMultistepScheduler(**kwargs, final_sigmas_type=final)
    plain.set_timesteps(n)
    np.testing.assert_allclose(schedules.dpm_sigmas(schedule, plain.timesteps.numpy(), final),
                               plain.sigmas.numpy(), rtol=3e-7, atol=0)


@pytest.mark.parametrize("n, strength", [(10, 0.2), (4, 0.5), (7, 0.8), (5, 1.0), (3, 0.34)])
def test_img2img_timesteps_equal_diffusers_get_timesteps(n, strength):
    sched = DDIMScheduler()
    sched.set_timesteps(n)
    init = min(int(n * strength), n)  # StableDiffusionImg2ImgPipeline.get_timesteps
    expected = sched.timesteps.numpy()[max(n - init, 0):]
    np.testing.assert_array_equal(schedules.img2img_timesteps(sched.timesteps.numpy(), strength), expected)


@pytest.mark.parametrize("strength, match", [(0.0, "strength must be in"), (1.5, "strength must be in"),
                                             (0.1, "leaves no step to run")])
def test_img2img_timesteps_errors(strength, match):
    with pytest.raises(ValueError, match=match):
        schedules.img2img_timesteps(schedules.ddim_timesteps(4), strength)
