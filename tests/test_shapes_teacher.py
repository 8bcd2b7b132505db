"""The shipped shapes teacher (lcm_jax/worlds/shapes/assets/teacher): diffusers loads it, its UNet, text
encoder and VAE match lcm-jax on the same inputs, and 50-step DDIM with CFG follows the prompts.
Also the VAE loss against its formula and the build tool's errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lcm_jax.worlds.shapes.autoencoder_loss import make_autoencoder_loss, reconstruction_error

from lcm_jax.worlds.shapes import TEACHER_DIR as TEACHER
# 50-step DDIM, CFG GUIDANCE, 32 held-out prompts, fully stated (0.0) and half under-stated (0.5,
# accuracy judging what each prompt states). The shipped teacher measured on these 32 (its README
# has 256): below. The thresholds leave room for the last digits of another CPU; colour chance
# is about 0.14.
GUIDANCE = 5.0
NUM_PROMPTS = 32
MEASURED = {0.0: {"prompt_accuracy": 0.219, "acc/background": 1.0, "acc/position": 0.969,
                  "acc/color": 0.5, "acc/shape": 0.375},
            0.5: {"prompt_accuracy": 0.25, "acc/background": 1.0, "acc/position": 0.806,
                  "acc/color": 0.4, "acc/shape": 0.406}}
MIN_ACCURACY = {0.0: {"prompt_accuracy": 0.1, "acc/background": 0.9, "acc/position": 0.85,
                      "acc/color": 0.3, "acc/shape": 0.25},
                0.5: {"prompt_accuracy": 0.1, "acc/background": 0.9, "acc/position": 0.65,
                      "acc/color": 0.25, "acc/shape": 0.25}}
# Per-caption diversity of 8 samples of 4 under-stated prompts (1: as varied as real images of
# them): 0.91 for the shipped teacher, 0.18 for the previous build, trained on fully stated
# captions only (it draws one image per caption).
MEASURED_DIVERSITY, MIN_DIVERSITY = 0.91, 0.6


def _rel_err(jax_out, torch_out) -> float:
    t = torch_out.detach().numpy()
    return float(np.max(np.abs(np.asarray(jax_out) - t)) / np.max(np.abs(t)))


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def jax_parts():
    from lcm_jax.components import load_components
    return load_components(TEACHER)


def test_folder_is_small_and_complete():
    files = {os.path.relpath(os.path.join(d, f), TEACHER) for d, _, fs in os.walk(TEACHER) for f in fs}
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/config.json", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "scheduler/scheduler_config.json", "README.md"):
        assert name in files, f"{TEACHER} lacks {name}; rebuild with lcm_jax/worlds/shapes/build_teacher.py"
    size = sum(os.path.getsize(os.path.join(TEACHER, f)) for f in files)
    assert size < 20e6, f"teacher folder is {size / 1e6:.1f} MB"


def test_diffusers_pipeline_matches_lcm_jax(jax_parts):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TEACHER, safety_checker=None,
                                                   requires_safety_checker=False)
    DDIMScheduler.from_config(pipe.scheduler.config)  # the teacher's sampler reads it too
    prompts = ["a large red circle in the center on a black background", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text_t = pipe.text_encoder(ids).last_hidden_state
    c = jax_parts
    text_j = c.text_encoder.apply({"params": c.text_params}, jnp.asarray(ids.numpy())).last_hidden_state
    assert _rel_err(text_j, text_t) <= 1e-5

    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([981, 37])
    with torch.no_grad():
        eps_t = pipe.unet(_nchw(z), torch.from_numpy(t), text_t).sample.permute(0, 2, 3, 1)
    eps_j = c.unet.apply({"params": c.unet_params}, jnp.asarray(z), jnp.asarray(t), text_j)
    assert eps_j.shape == (2, 8, 8, 4)
    assert _rel_err(eps_j, eps_t) <= 1e-5

    with torch.no_grad():
        img_t = pipe.vae.decode(_nchw(z) / pipe.vae.config.scaling_factor).sample.permute(0, 2, 3, 1)
    img_j = c.vae.apply({"params": c.vae_params}, jnp.asarray(z) / c.vae.scaling_factor, method="decode")
    assert _rel_err(img_j, img_t) <= 1e-5


@pytest.fixture(scope="module")
def teacher_pipe():
    from lcm_jax.pipeline import LCMPipeline
    return LCMPipeline.from_pretrained(TEACHER)


@pytest.fixture(scope="module")
def evaluator():
    from lcm_jax.worlds.shapes.evaluator import ShapesEvaluator
    return ShapesEvaluator()


def _ddim(pipe, prompts):
    return pipe(prompts, num_inference_steps=50, guidance_scale=GUIDANCE, height=64, width=64,
                seed=0, sampler="ddim")


@pytest.mark.parametrize("understated", [0.0, 0.5])
def test_teacher_ddim_follows_heldout_prompts(teacher_pipe, evaluator, understated):
    from lcm_jax.worlds.shapes.evaluator import heldout_prompts

    prompts, _ = heldout_prompts(NUM_PROMPTS, understated=understated)
    images = _ddim(teacher_pipe, prompts)
    assert images.shape == (NUM_PROMPTS, 64, 64, 3)
    acc = evaluator.prompt_accuracy(images, prompts)
    for key, low in MIN_ACCURACY[understated].items():
        assert acc[key] >= low, f"teacher {key} {acc[key]} < {low} (measured {MEASURED[understated][key]}): {acc}"


def test_teacher_varies_what_a_prompt_leaves_out(teacher_pipe, evaluator):
    """8 samples of each of 4 under-stated prompts vary about as much as real images of them."""
    from lcm_jax.worlds.shapes.methods import diversity_prompts

    prompts = diversity_prompts(4)
    diversity = evaluator.diversity(_ddim(teacher_pipe, prompts), prompts)
    assert diversity >= MIN_DIVERSITY, (diversity, MEASURED_DIVERSITY)


def test_autoencoder_loss_is_reconstruction_plus_beta_kl():
    from lcm_jax.models.vae import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    params = vae.init(jax.random.PRNGKey(0), x)["params"]
    rng = jax.random.PRNGKey(3)
    loss, terms = make_autoencoder_loss(vae, "l2", beta=0.01)(params, x, rng)
    post = vae.apply({"params": params}, x, method="encode")
    x_hat = vae.apply({"params": params}, post.sample(rng), method="decode")
    rec = np.mean((np.asarray(x_hat) - np.asarray(x)) ** 2, axis=(1, 2, 3))
    mu, logvar = np.asarray(post.mean), np.asarray(post.logvar)
    kl = 0.5 * np.sum(mu ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
    np.testing.assert_allclose(terms.reconstruction, rec, rtol=1e-5)
    np.testing.assert_allclose(terms.kl, kl, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(rec + 0.01 * kl), rtol=1e-5)
    l1 = reconstruction_error(x, x_hat, "l1")
    np.testing.assert_allclose(l1, np.mean(np.abs(np.asarray(x_hat) - np.asarray(x)), axis=(1, 2, 3)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="reconstruction loss 'huber' unknown"):
        make_autoencoder_loss(vae, "huber")


def test_foreground_weighted_reconstruction():
    """Pixels off the border's median colour weigh `foreground_weight`; the error is their
    weighted mean, equal to a numpy computation; weight 1 is the plain loss."""
    from lcm_jax.worlds.shapes.autoencoder_loss import foreground_weights
    from lcm_jax.models.vae import AutoencoderKL

    x = np.full((2, 8, 8, 3), -0.5, np.float32)
    x[0, 2:4, 3:6] = (0.9, -0.2, 0.1)       # a 2x3 "shape" on image 0
    x[1, 0, 0] = (1.0, 1.0, 1.0)            # one odd border pixel: not the background
    w = np.asarray(foreground_weights(jnp.asarray(x), 5.0))[..., 0]
    expect = np.ones((2, 8, 8))
    expect[0, 2:4, 3:6] = 5.0
    expect[1, 0, 0] = 5.0
    np.testing.assert_array_equal(w, expect)

    vae = AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4)
    params = vae.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    rng = jax.random.PRNGKey(3)
    _, terms = make_autoencoder_loss(vae, "l1", beta=0.0, foreground_weight=5.0)(params, x, rng)
    post = vae.apply({"params": params}, x, method="encode")
    err = np.abs(np.asarray(vae.apply({"params": params}, post.sample(rng), method="decode")) - x)
    rec = (expect[..., None] * err).sum(axis=(1, 2, 3)) / (expect.sum(axis=(1, 2)) * 3)
    np.testing.assert_allclose(terms.reconstruction, rec, rtol=1e-5)
    _, plain = make_autoencoder_loss(vae, "l1", beta=0.0, foreground_weight=1.0)(params, x, rng)
    np.testing.assert_allclose(plain.reconstruction, err.mean(axis=(1, 2, 3)), rtol=1e-5)


def test_build_tool_names_missing_checkpoint(tmp_path):
    from lcm_jax.worlds.shapes import build_teacher as tool

    with pytest.raises(FileNotFoundError, match="no checkpoint in .*train the teacher first"):
        tool.final_unet_params(str(tmp_path))



def test_scale_latents_multiplies_only_the_vae_scaling_factor(tmp_path):
    """--latent_scale: the copied VAE config's scaling_factor times the scale, every other key
    and the source folder as they were."""
    import json
    import shutil

    from lcm_jax.worlds.shapes import build_teacher as tool

    source = os.path.join(TEACHER, "vae", "config.json")
    with open(source) as f:
        shipped = json.load(f)
    shutil.copytree(os.path.join(TEACHER, "vae"), tmp_path / "vae",
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    tool.scale_latents(str(tmp_path), 0.5)
    scaled = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert scaled["scaling_factor"] == pytest.approx(0.5 * shipped["scaling_factor"], rel=1e-12)
    assert {**scaled, "scaling_factor": shipped["scaling_factor"]} == shipped
    with open(source) as f:
        assert json.load(f) == shipped
