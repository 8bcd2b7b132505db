"""ControlNet against diffusers: ControlNetModel's residuals and the UNet taking them (within
1e-5, fp32), and LCMPipeline with a ControlNet against StableDiffusion(XL)ControlNetPipeline on
tiny random-weight folders (images within 1e-3)."""
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tiny_pipeline import _perturb, build_pipeline
from tiny_sdxl import build_sdxl_pipeline

from lcm_jax.convert.common import WeightsError
from lcm_jax.convert.controlnet import load_controlnet
from lcm_jax.convert.unet import load_unet
from lcm_jax.pipeline import LCMPipeline

PROMPT = ["a red circle"]
EMBED = (8, 16, 16, 16)  # the conditioning embedding: three stride-2 convs, the VAE's factor 8


def save_controlnet(unet, folder: str, seed: int):
    """A ControlNet copied from `unet` (as diffusers' from_unet), perturbed so that its zero
    convolutions are not zero; saved to `folder`."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    cn = _perturb(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBED,
                                                  load_weights_from_unet=False), seed)
    cn.save_pretrained(folder, safe_serialization=True)
    return cn


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lcm"))
    tpipe = build_pipeline(path)
    cn = save_controlnet(tpipe.unet, os.path.join(path, "controlnet"), seed=5)
    return tpipe, cn, path, LCMPipeline.from_pretrained(path, controlnet=os.path.join(path, "controlnet"))


@pytest.fixture(scope="module")
def control_image():
    return np.random.default_rng(0).uniform(size=(1, 64, 64, 3)).astype(np.float32)


def nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def test_controlnet_and_unet_residuals_match_diffusers(lcm):
    tpipe, cn, path, _ = lcm
    model, params = load_controlnet(os.path.join(path, "controlnet"))
    unet, unet_params = load_unet(os.path.join(path, "unet"))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    image, t, w = torch.rand(2, 3, 64, 64, generator=g), torch.tensor([10, 500]), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        down, mid = cn(x, t, ctx, image, conditioning_scale=0.7, return_dict=False)
        ref = tpipe.unet(x, t, ctx, timestep_cond=w, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
    ours_down, ours_mid = model.apply({"params": params}, nhwc(x), jnp.asarray(t.numpy()),
                                      jnp.asarray(ctx.numpy()), nhwc(image), 0.7)
    assert len(ours_down) == len(down) == 4
    for a, b in zip(ours_down + (ours_mid,), list(down) + [mid]):
        np.testing.assert_allclose(a, b.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    out = unet.apply({"params": unet_params}, nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()),
                     timestep_cond=jnp.asarray(w.numpy()), down_block_additional_residuals=ours_down,
                     mid_block_additional_residual=ours_mid)
    np.testing.assert_allclose(out, ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    assert np.abs(ref.numpy() - tpipe.unet(x, t, ctx, timestep_cond=w).sample.detach().numpy()).max() > 1e-2


def torch_draws(seed: int, count: int, shape=(1, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(count)]


def assert_images_close(ours, ref):
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    err = np.abs(ours - ref).max()
    assert err <= 1e-3, err


def test_lcm_controlnet_pipeline_matches_diffusers(lcm, control_image, steps=3, scale=0.5):
    """A w-conditioned LCM with a ControlNet in StableDiffusionControlNetPipeline (LCMScheduler)."""
    from diffusers import StableDiffusionControlNetPipeline

    tpipe, cn, _, pipe = lcm
    tcn = StableDiffusionControlNetPipeline.from_pipe(tpipe, controlnet=cn)
    ref = tcn(PROMPT, image=control_image, num_inference_steps=steps, guidance_scale=8.5, height=64,
              width=64, controlnet_conditioning_scale=scale, generator=torch.Generator().manual_seed(1),
              output_type="np").images
    latents, *noises = torch_draws(1, 1 + steps)
    ours = pipe(PROMPT, num_inference_steps=steps, guidance_scale=8.5, height=64, width=64,
                latents=latents, noises=np.stack(noises), image=control_image,
                controlnet_conditioning_scale=scale)
    assert_images_close(ours, ref)
    unconditioned = pipe(PROMPT, num_inference_steps=steps, guidance_scale=8.5, height=64, width=64,
                         latents=latents, noises=np.stack(noises), image=control_image,
                         controlnet_conditioning_scale=0.0)
    assert np.abs(unconditioned - ours).max() > 1e-2  # the ControlNet changes the image


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, lcm):
    path = str(tmp_path_factory.mktemp("teacher"))
    tpipe = build_pipeline(path, time_cond_proj_dim=None, seed=3)
    return tpipe, LCMPipeline.from_pretrained(path, controlnet=os.path.join(lcm[2], "controlnet"))


def test_teacher_controlnet_with_cfg_matches_diffusers(lcm, teacher, control_image):
    """A plain UNet with CFG and DDIM: the ControlNet runs on both halves of the CFG batch."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    tpipe, pipe = teacher
    sched = DDIMScheduler.from_config(tpipe.scheduler.config, clip_sample=False)  # as the folder
    ref = StableDiffusionControlNetPipeline.from_pipe(tpipe, controlnet=lcm[1], scheduler=sched)(
        PROMPT, image=control_image, num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
        controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(2),
        output_type="np").images
    (latents,) = torch_draws(2, 1)
    ours = pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, height=64, width=64, latents=latents,
                sampler="ddim", image=control_image, controlnet_conditioning_scale=0.8)
    assert_images_close(ours, ref)


def test_teacher_controlnet_img2img_matches_diffusers(lcm, teacher, control_image):
    """img2img with a ControlNet (`control_image`) as StableDiffusionControlNetImg2ImgPipeline."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetImg2ImgPipeline

    tpipe, pipe = teacher
    image = control_image[:, ::-1].copy()  # another image to start from
    sched = DDIMScheduler.from_config(tpipe.scheduler.config, clip_sample=False)
    ref = StableDiffusionControlNetImg2ImgPipeline.from_pipe(tpipe, controlnet=lcm[1], scheduler=sched)(
        PROMPT, image=image, control_image=control_image, strength=0.5, num_inference_steps=4,
        guidance_scale=4.0, controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(6),
        output_type="np").images
    posterior, noise = torch_draws(6, 2)
    ours = pipe.img2img(PROMPT, image, strength=0.5, num_inference_steps=4, guidance_scale=4.0, sampler="ddim",
                        noise=noise, posterior_noise=posterior, control_image=control_image,
                        controlnet_conditioning_scale=0.8)
    assert_images_close(ours, ref)


def test_sdxl_controlnet_pipeline_matches_diffusers(tmp_path, control_image):
    """SDXL: the ControlNet takes the pooled text embeds and micro-conditioning as the UNet."""
    from diffusers import StableDiffusionXLControlNetPipeline

    path = str(tmp_path / "sdxl")
    tpipe = build_sdxl_pipeline(path)
    cn = save_controlnet(tpipe.unet, os.path.join(path, "controlnet"), seed=7)
    ref = StableDiffusionXLControlNetPipeline.from_pipe(tpipe, controlnet=cn)(
        PROMPT, image=control_image, num_inference_steps=1, guidance_scale=8.5, height=64, width=64,
        generator=torch.Generator().manual_seed(3), output_type="np").images
    latents, *noises = torch_draws(3, 2)
    pipe = LCMPipeline.from_pretrained(path, controlnet=os.path.join(path, "controlnet"))
    ours = pipe(PROMPT, num_inference_steps=1, guidance_scale=8.5, height=64, width=64, latents=latents,
                noises=np.stack(noises), image=control_image)
    assert_images_close(ours, ref)


def test_controlnet_input_errors(lcm, control_image, tmp_path):
    pipe = lcm[3]
    args = dict(num_inference_steps=1, height=64, width=64)
    with pytest.raises(ValueError, match="a ControlNet was loaded: pass its conditioning image"):
        pipe(PROMPT, **args)
    with pytest.raises(ValueError, match="the ControlNet image is 32x32 but the output is 64x64"):
        pipe(PROMPT, image=control_image[:, :32, :32], **args)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale must be >= 0"):
        pipe(PROMPT, image=control_image, controlnet_conditioning_scale=float("nan"), **args)
    plain = LCMPipeline(dataclasses.replace(pipe.components, controlnet=None, controlnet_params=None))
    with pytest.raises(ValueError, match="is a ControlNet's conditioning image, but none is loaded"):
        plain(PROMPT, image=control_image, **args)
    from diffusers import ControlNetModel, UNet2DConditionModel
    from tiny_pipeline import UNET
    other = UNet2DConditionModel(**dict(UNET, block_out_channels=(16, 32), norm_num_groups=4))
    ControlNetModel.from_unet(other, conditioning_embedding_out_channels=EMBED, load_weights_from_unet=False).save_pretrained(
        str(tmp_path / "other"))
    with pytest.raises(WeightsError, match="block_out_channels .* differs from the UNet's"):
        plain.load_controlnet(str(tmp_path / "other"))
