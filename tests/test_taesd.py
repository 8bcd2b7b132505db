"""AutoencoderTiny (TAESD) against diffusers: encoder and decoder within 1e-5 (fp32), and the
pipeline decoding with it against diffusers' LatentConsistencyModelPipeline given the same
AutoencoderTiny (images within 1e-3)."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tiny_pipeline import _perturb, build_pipeline

from lcm_jax.convert.common import WeightsError
from lcm_jax.convert.taesd import load_taesd
from lcm_jax.pipeline import LCMPipeline

TINY = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 1))


def save_taesd(folder: str, seed: int = 0, **overrides):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = _perturb(AutoencoderTiny(**{**TINY, **overrides}), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("taesd")
    tpipe = build_pipeline(str(root / "pipe"))
    return tpipe, save_taesd(str(root / "taesd")), str(root / "pipe"), str(root / "taesd")


def nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def test_encoder_and_decoder_match_diffusers(folders):
    _, model, _, path = folders
    module, params = load_taesd(path)
    g = torch.Generator().manual_seed(0)
    images, latents = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        ref_z, ref_x = model.encode(images).latents, model.decode(latents).sample
    posterior = module.apply({"params": params}, nhwc(images), method="encode")
    np.testing.assert_allclose(posterior.mean, ref_z.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    assert float(np.abs(np.asarray(posterior.std)).max()) == 0.0  # deterministic, as diffusers' .latents
    decoded = module.apply({"params": params}, nhwc(latents), method="decode")
    np.testing.assert_allclose(decoded, ref_x.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    assert module.downsample_factor == 8 and module.latent_channels == 4


def test_pipeline_with_tiny_vae_matches_diffusers(folders):
    tpipe, model, pipe_path, path = folders
    from diffusers import LatentConsistencyModelPipeline

    ref = LatentConsistencyModelPipeline.from_pipe(tpipe, vae=model)(
        ["a red circle"], num_inference_steps=2, guidance_scale=8.5, height=64, width=64,
        generator=torch.Generator().manual_seed(1), output_type="np").images
    g = torch.Generator().manual_seed(1)
    latents, *noises = [torch.randn((1, 4, 8, 8), generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(3)]
    pipe = LCMPipeline.from_pretrained(pipe_path, vae=path)
    ours = pipe(["a red circle"], num_inference_steps=2, guidance_scale=8.5, height=64, width=64,
                latents=latents, noises=np.stack(noises))
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()


def test_a_tiny_vae_of_another_latent_space_is_refused(folders, tmp_path):
    save_taesd(str(tmp_path / "taesd16"), latent_channels=16)
    with pytest.raises(WeightsError, match="the VAE's latent_channels is 16, the pipeline's 4"):
        LCMPipeline.from_pretrained(folders[2], vae=str(tmp_path / "taesd16"))
    with open(os.path.join(folders[3], "config.json")) as f:
        text = f.read().replace('"act_fn": "relu"', '"act_fn": "gelu"')
    os.makedirs(tmp_path / "gelu")
    with open(tmp_path / "gelu" / "config.json", "w") as f:
        f.write(text)
    with pytest.raises(WeightsError, match=r"act_fn='gelu' is not supported \(only 'relu'\)"):
        load_taesd(str(tmp_path / "gelu"))
