"""img2img and inpainting against diffusers' pipelines on tiny random-weight folders: the same
image, mask and draws (the VAE encodes', the added noise, the re-noising), images within 1e-3."""
import numpy as np
import pytest
import torch

from tiny_pipeline import UNET, build_pipeline

from lcm_jax.pipeline import LCMPipeline

PROMPT = ["a red circle"]
LATENT = (1, 4, 8, 8)  # NCHW latents of a 64x64 image (VAE factor 8)


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lcm"))
    return build_pipeline(path), LCMPipeline.from_pretrained(path)


@pytest.fixture(scope="module")
def image_and_mask():
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 64, 64, 1), np.float32)
    mask[:, 16:48, 8:40] = 1.0
    return rng.uniform(size=(1, 64, 64, 3)).astype(np.float32), mask


def torch_draws(seed, count):
    """The first `count` latent-shaped draws of a torch generator seeded `seed`, NHWC."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LATENT, generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(count)]


def assert_images_close(ours, ref):
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    err = np.abs(ours - ref).max()
    assert err <= 1e-3, err


def test_lcm_img2img_matches_diffusers(lcm, image_and_mask):
    """A w-conditioned LCM as LatentConsistencyModelImg2ImgPipeline: 3 steps from the 0.6 grid."""
    from diffusers import LatentConsistencyModelImg2ImgPipeline

    tpipe, pipe = lcm
    image, _ = image_and_mask
    ref = LatentConsistencyModelImg2ImgPipeline.from_pipe(tpipe)(
        PROMPT, image=image, strength=0.6, num_inference_steps=3, guidance_scale=8.5,
        generator=torch.Generator().manual_seed(1), output_type="np").images
    posterior, noise, *steps = torch_draws(1, 2 + 3)  # the encode, the added noise, the steps
    ours = pipe.img2img(PROMPT, image, strength=0.6, num_inference_steps=3, guidance_scale=8.5,
                        noise=noise, posterior_noise=posterior, noises=np.stack(steps))
    assert_images_close(ours, ref)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher"))
    return build_pipeline(path, time_cond_proj_dim=None, seed=3), LCMPipeline.from_pretrained(path)


@pytest.mark.parametrize("sampler, scheduler, options", [
    ("ddim", "DDIMScheduler", {}),
    ("dpm", "DPMSolverMultistepScheduler", {}),
])
def test_teacher_img2img_matches_diffusers(teacher, image_and_mask, sampler, scheduler, options):
    """A plain UNet with CFG as StableDiffusionImg2ImgPipeline: the last 3 of 6 steps."""
    import diffusers

    tpipe, pipe = teacher
    image, _ = image_and_mask
    sched = getattr(diffusers, scheduler).from_config(tpipe.scheduler.config, **options)
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(tpipe, scheduler=sched)(
        PROMPT, image=image, strength=0.5, num_inference_steps=6, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(2), output_type="np").images
    posterior, noise = torch_draws(2, 2)
    ours = pipe.img2img(PROMPT, image, strength=0.5, num_inference_steps=6, guidance_scale=4.0,
                        sampler=sampler, noise=noise, posterior_noise=posterior)
    assert_images_close(ours, ref)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lcm_inpaint_mask_blend_matches_diffusers(lcm, image_and_mask, strength):
    """A 4-channel UNet in StableDiffusionInpaintPipeline (LCMScheduler): the mask blend."""
    from diffusers import StableDiffusionInpaintPipeline

    tpipe, pipe = lcm
    image, mask = image_and_mask
    ref = StableDiffusionInpaintPipeline.from_pipe(tpipe)(
        PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=4,
        guidance_scale=8.5, height=64, width=64, generator=torch.Generator().manual_seed(3),
        output_type="np").images
    # the image's encode, the noise, the masked image's encode (unused by 4 channels), the steps
    posterior, noise, _, *steps = torch_draws(3, 3 + int(4 * strength))
    ours = pipe.inpaint(PROMPT, image, mask, strength=strength, num_inference_steps=4, guidance_scale=8.5,
                        noise=noise, posterior_noise=posterior, noises=np.stack(steps))
    assert_images_close(ours, ref)
    kept = np.abs(ours - image)[0][mask[0, ..., 0] == 0].mean()
    assert kept < np.abs(ours - image)[0][mask[0, ..., 0] == 1].mean()


@pytest.fixture(scope="module")
def inpainting_teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inpaint9"))
    return (build_pipeline(path, time_cond_proj_dim=None, seed=4, unet=dict(UNET, in_channels=9)),
            LCMPipeline.from_pretrained(path))


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_9_channel_inpaint_matches_diffusers(inpainting_teacher, image_and_mask, strength):
    """An SD inpainting UNet (latents + mask + masked-image latents) with CFG and DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    tpipe, pipe = inpainting_teacher
    image, mask = image_and_mask
    ref = StableDiffusionInpaintPipeline.from_pipe(
        tpipe, scheduler=DDIMScheduler.from_config(tpipe.scheduler.config, clip_sample=False))(
        PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=4, guidance_scale=3.0,
        height=64, width=64, generator=torch.Generator().manual_seed(4), output_type="np").images
    if strength == 1.0:  # pure noise: the image itself is not encoded
        noise, masked = torch_draws(4, 2)
        posterior = None
    else:
        posterior, noise, masked = torch_draws(4, 3)
    ours = pipe.inpaint(PROMPT, image, mask, strength=strength, num_inference_steps=4, guidance_scale=3.0,
                        sampler="ddim", noise=noise, posterior_noise=posterior, masked_posterior_noise=masked)
    assert_images_close(ours, ref)


def test_negative_prompt_is_refused_where_it_would_be_ignored(lcm, teacher):
    with pytest.raises(ValueError, match="negative_prompt has no effect with this w-conditioned LCM"):
        lcm[1](PROMPT, num_inference_steps=1, height=64, width=64, negative_prompt="blurry")
    with pytest.raises(ValueError, match="negative_prompt has no effect at guidance_scale=1.0"):
        teacher[1](PROMPT, num_inference_steps=1, height=64, width=64, guidance_scale=1.0,
                   negative_prompt="blurry")


@pytest.mark.parametrize("call, match", [
    (lambda p, im, m: p.img2img(PROMPT, im[:, :60], strength=0.5), "multiples of 8"),
    (lambda p, im, m: p.img2img(PROMPT, im * 2, strength=0.5), r"image values must be in \[0, 1\]"),
    (lambda p, im, m: p.img2img(PROMPT, im[..., :1], strength=0.5), r"RGB, got shape \(1, 64, 64, 1\)"),
    (lambda p, im, m: p.img2img(PROMPT, im, strength=0.0), r"strength must be in \(0, 1\]"),
    (lambda p, im, m: p.img2img(PROMPT, im, sampler="euler"), "sampler 'euler' unknown"),
    (lambda p, im, m: p.inpaint(PROMPT, im, m, num_inference_steps=0), "num_inference_steps must be >= 1"),
    (lambda p, im, m: p.img2img(PROMPT * 3, np.concatenate([im, im]), strength=0.5), "does not divide"),
    (lambda p, im, m: p.inpaint(PROMPT, im, m[:, :32]), "mask_image must be"),
    (lambda p, im, m: p.img2img(PROMPT, im, strength=0.5, noise=np.zeros((1, 4, 4, 4))),
     r"noise have shape \(1, 4, 4, 4\), expected \(1, 8, 8, 4\)"),
])
def test_edit_input_errors(lcm, image_and_mask, call, match):
    with pytest.raises(ValueError, match=match):
        call(lcm[1], *image_and_mask)



def test_img2img_jit_equals_eager_and_model_compile(lcm, image_and_mask):
    pipe = lcm[1]
    image, mask = image_and_mask
    args = dict(strength=0.5, num_inference_steps=2, seed=5)
    whole = pipe.inpaint(PROMPT, image, mask, **args)
    np.testing.assert_allclose(pipe.inpaint(PROMPT, image, mask, debug=True, **args), whole, atol=1e-5)
    np.testing.assert_allclose(pipe.inpaint(PROMPT, image, mask, compile="model", **args), whole, atol=1e-5)
