"""LCMPipeline against diffusers' LatentConsistencyModelPipeline on a tiny random-weight folder."""
import numpy as np
import pytest
import torch

from tiny_pipeline import build_pipeline

from lcm_jax.convert.common import WeightsError
from lcm_jax.pipeline import LCMPipeline

PROMPTS = ["a red circle", "a big blue star at the top"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("lcm_pipeline")
    return str(path), build_pipeline(str(path))


@pytest.fixture(scope="module")
def pipe(folder, tmp_path_factory):
    return LCMPipeline.from_pretrained(folder[0])


def _torch_reference(tpipe, steps, latents_nhwc, seed):
    """diffusers' images and the re-noising draws its LCMScheduler made (same generator order)."""
    latents = torch.from_numpy(latents_nhwc.transpose(0, 3, 1, 2).copy())
    g = torch.Generator().manual_seed(seed)
    out = tpipe(PROMPTS, num_inference_steps=steps, guidance_scale=8.5, height=64, width=64,
                latents=latents, generator=g, output_type="np", original_inference_steps=50)
    g = torch.Generator().manual_seed(seed)
    noises = [torch.randn(latents.shape, generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(steps)]
    return out.images, np.stack(noises)


def _assert_matches(pipe, tpipe, steps: int, latent_size: int) -> None:
    """64x64 images from the same latents and re-noising draws, within 1e-3 of diffusers'."""
    latents = np.random.default_rng(steps).standard_normal((2, latent_size, latent_size, 4))
    ref, noises = _torch_reference(tpipe, steps, latents.astype(np.float32), seed=steps)
    ours = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=8.5, height=64, width=64,
                latents=latents.astype(np.float32), noises=noises)
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_matches_diffusers(folder, pipe, steps):
    tpipe = folder[1]
    _assert_matches(pipe, tpipe, steps, latent_size=8)


def test_seeded_and_jit_equals_debug(pipe):
    a = pipe(PROMPTS[:1], num_inference_steps=2, height=64, width=64, seed=3)
    b = pipe(PROMPTS[:1], num_inference_steps=2, height=64, width=64, seed=3)
    c = pipe(PROMPTS[:1], num_inference_steps=2, height=64, width=64, seed=4)
    d = pipe(PROMPTS[:1], num_inference_steps=2, height=64, width=64, seed=3, debug=True)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    np.testing.assert_allclose(a, d, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
    (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (dict(height=60), "multiples of 8"),
    (dict(sampler="euler"), "sampler 'euler' unknown"),
])
def test_bad_arguments(pipe, kwargs, match):
    args = {"height": 64, "width": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", **args)


def test_long_prompt_warns(pipe):
    with pytest.warns(UserWarning, match="truncated"):
        pipe("a very long prompt that does not fit", num_inference_steps=1, height=64, width=64)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(WeightsError, match="no model_index.json"):
        LCMPipeline.from_pretrained(str(tmp_path))


def test_lora_fused_equals_unfused(folder, tmp_path):
    import jax

    from lcm_jax.convert.lora import save_lora_peft
    from lcm_jax.models import lora as lora_lib

    fused = LCMPipeline.from_pretrained(folder[0])
    factors = lora_lib.init_lora(jax.random.PRNGKey(0), fused.unet_params, rank=2)
    factors = jax.tree.map(lambda x: x + 0.05, factors)  # nonzero `up`: the LoRA changes the UNet
    path = str(tmp_path / "lora.safetensors")
    save_lora_peft(factors, 1.0, path)
    args = dict(num_inference_steps=2, height=64, width=64, seed=1)
    plain = fused(PROMPTS[:1], **args)
    fused.load_lora_weights(path, fuse=True)
    unfused = LCMPipeline.from_pretrained(folder[0])
    unfused.load_lora_weights(path, fuse=False)
    a, b = fused(PROMPTS[:1], **args), unfused(PROMPTS[:1], **args)
    assert np.abs(a - plain).max() > 1e-3
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("grid", [50, 20, 10])
def test_lcm_steps_come_from_the_scheduler_configs_grid(pipe, grid):
    from diffusers import LCMScheduler

    config = {**pipe.components.scheduler_config, "original_inference_steps": grid}
    ref = LCMScheduler.from_config(config)
    ref.set_timesteps(4)
    old = pipe.components.scheduler_config
    pipe.components.scheduler_config = config
    try:
        np.testing.assert_array_equal(pipe.timesteps("lcm", 4), ref.timesteps.numpy())
        ref.set_timesteps(4, original_inference_steps=50)
        np.testing.assert_array_equal(pipe.timesteps("lcm", 4, original_inference_steps=50),
                                      ref.timesteps.numpy())
    finally:
        pipe.components.scheduler_config = old


@pytest.mark.parametrize("steps", [1, 2])
def test_vae_downsampling_by_2_gives_the_requested_size(tmp_path_factory, steps):
    """diffusers' own LCM pipeline test components: their VAE downsamples by 2 (vae_scale_factor
    from block_out_channels), so 64x64 images start from 32x32 latents, as in diffusers."""
    from tiny_pipeline import build_diffusers_test_pipeline

    path = str(tmp_path_factory.mktemp("factor2"))
    tpipe = build_diffusers_test_pipeline(path)
    ours = LCMPipeline.from_pretrained(path)
    assert ours.vae_factor == tpipe.vae_scale_factor == 2
    _assert_matches(ours, tpipe, steps, latent_size=32)
    assert ours(PROMPTS[:1], num_inference_steps=1, height=48, width=80).shape == (1, 48, 80, 3)
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(PROMPTS[:1], num_inference_steps=1, height=63, width=64)
