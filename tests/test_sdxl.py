"""SDXL: LCMPipeline against diffusers' StableDiffusionXLPipeline (LCM and CFG + DDIM) on tiny
random-weight folders, and one LCD training step with an SDXL teacher."""
import json
import os

import jax
import numpy as np
import pytest
import torch

from tiny_sdxl import build_sdxl_pipeline

from lcm_jax.pipeline import LCMPipeline

PROMPTS = ["a red circle", "a big blue star"]


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sdxl_lcm"))
    tpipe = build_sdxl_pipeline(path, time_cond_proj_dim=32, scheduler="lcm")
    return tpipe, LCMPipeline.from_pretrained(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sdxl_teacher"))
    return path, build_sdxl_pipeline(path, time_cond_proj_dim=None, scheduler="ddim", seed=1)


def _nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _latents(seed):
    return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_matches_diffusers(lcm, steps):
    tpipe, pipe = lcm
    latents = _latents(steps)
    ref = tpipe(PROMPTS, num_inference_steps=steps, guidance_scale=8.5, height=64, width=64,
                latents=_nchw(latents), generator=torch.Generator().manual_seed(steps),
                output_type="np").images
    g = torch.Generator().manual_seed(steps)  # the LCMScheduler's re-noising draws, in order
    noises = np.stack([torch.randn((2, 4, 8, 8), generator=g).numpy().transpose(0, 2, 3, 1)
                       for _ in range(steps)])
    ours = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=8.5, height=64, width=64,
                latents=latents, noises=noises)
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    err = np.abs(ours - ref).max()
    print(f"SDXL LCM {steps} steps: max abs err {err:.2e}")
    assert err <= 1e-3, err


@pytest.mark.parametrize("negative_prompt", [None, "a green square"])
def test_cfg_ddim_matches_diffusers(teacher, tmp_path, negative_prompt):
    """No negative prompt: zeros for embeddings and pooled (force_zeros_for_empty_prompt)."""
    folder, tpipe = teacher
    pipe = LCMPipeline.from_pretrained(folder)
    assert pipe.components.force_zeros_for_empty_prompt
    latents = _latents(7)
    ref = tpipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                latents=_nchw(latents), negative_prompt=negative_prompt, output_type="np").images
    ours = pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                latents=latents, negative_prompt=negative_prompt, sampler="ddim")
    err = np.abs(ours - ref).max()
    print(f"SDXL CFG+DDIM (negative {negative_prompt!r}): max abs err {err:.2e}")
    assert err <= 1e-3, err


def _image_folder(path, n=4):
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (72, 80, 3), np.uint8)).save(os.path.join(path, f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "text": PROMPTS[i % 2]}) + "\n")
    return str(path)


def _lcd_config(teacher_folder, data):
    from lcm_jax.defaults import base_config

    c = base_config()
    c.model.teacher = teacher_folder
    c.model.time_cond_proj_dim = 32
    c.data.source, c.data.path = "folder", data
    c.data.resolution, c.data.latent_size, c.data.text_len = 64, 8, 16
    c.batch_size, c.total_steps, c.log_every = 2, 2, 1
    c.async_checkpointing = False
    c.optim.warmup_steps = 0
    return c


def test_lcd_encode_matches_diffusers_conditioning(teacher, tmp_path):
    """make_encode's SDXL batch: diffusers' prompt embeds and pooled embeds, zeros for uncond,
    and time_ids (resolution, resolution, 0, 0, resolution, resolution)."""
    from lcm_jax.training import models as tm
    from lcm_jax.training.step import make_encode

    folder, tpipe = teacher
    config = _lcd_config(folder, _image_folder(tmp_path / "images"))
    models = tm.build_models(config)
    ids = tm.tokenize_fn(models)(PROMPTS)
    frozen = {**models.frozen, "uncond_embeds": tm.uncond_embeds(models)}
    batch = {"latents": np.zeros((2, 8, 8, 4), np.float32), "input_ids": ids}
    out = make_encode(config, models)(frozen, batch, jax.random.PRNGKey(0))
    with torch.no_grad():
        ref, _, ref_pooled, _ = tpipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    np.testing.assert_allclose(out["prompt_embeds"], ref.numpy(), atol=1e-5 * np.abs(ref.numpy()).max())
    np.testing.assert_allclose(out["added_cond"]["text_embeds"], ref_pooled.numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["added_cond"]["time_ids"], [[64, 64, 0, 0, 64, 64]] * 2)
    assert out["uncond_embeds"].shape == ref.shape and not np.any(out["uncond_embeds"])
    assert not np.any(out["uncond_added_cond"]["text_embeds"])


def test_lcd_step_with_sdxl_teacher(teacher, tmp_path):
    from lcm_jax import train

    config = _lcd_config(teacher[0], _image_folder(tmp_path / "images"))
    train.train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows), rows


def test_random_sdxl_teacher_initialises():
    """A teacher built from an SDXL UNet config (no folder): the init traces the micro-conditioning
    and the student's parameters are exactly unet_shapes' tree."""
    from tiny_sdxl import UNET

    from lcm_jax.convert.unet import unet_shapes
    from lcm_jax.defaults import base_config
    from lcm_jax.training import models as tm

    c = base_config()
    c.model.unet = {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()}
    c.model.time_cond_proj_dim = 32
    c.data.latent_size, c.data.text_len = 8, 16
    models = tm.build_models(c)
    want = jax.tree.map(lambda s: s.shape, unet_shapes(models.unet))
    assert jax.tree.map(np.shape, models.init_params) == want
    assert "add_embedding" in models.init_params and "cond_proj" in models.init_params["time_embedding"]
