"""Single-file SD 1.x (LDM layout) checkpoints: key renaming checked against diffusers' converters."""
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint,
                                                 convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel

from lcm_jax.convert import common
from lcm_jax.convert import single_file as sf

UNET = dict(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, sample_size=8)
VAE = dict(block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=8,
           latent_channels=4, sample_size=32)
CLIP = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
            bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _numpy(model) -> dict:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))[:10]
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = _randomised(TorchUNet(**UNET))
    vae = _randomised(TorchAutoencoderKL(**VAE))
    clip = _randomised(CLIPTextModel(CLIPTextConfig(**CLIP)))
    return unet, vae, clip


def _clip_sd(clip) -> dict:
    """The transformers-4 / SD naming (`text_model.` prefix; transformers 5 drops it)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in _numpy(clip).items()}


@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_unet_round_trip_matches_diffusers_converter(layers_per_block):
    config = {**UNET, "layers_per_block": layers_per_block}
    torch.manual_seed(0)
    want = _numpy(TorchUNet(**config))
    ldm = sf.diffusers_to_ldm_unet(want, config)
    # the known SD 1.x names: resnet leaves, downsampler op, upsampler after an attention
    lpb = layers_per_block
    for key in ("input_blocks.1.0.in_layers.0.weight", "input_blocks.1.1.proj_in.weight",
                f"input_blocks.{lpb + 1}.0.op.weight", "middle_block.1.norm.weight",
                "time_embed.2.weight", "out.2.bias", f"output_blocks.{lpb}.1.conv.weight",
                f"output_blocks.{2 * (lpb + 1) - 1}.2.conv.weight"):
        assert key in ldm, key
    diffusers_back = convert_ldm_unet_checkpoint({sf.UNET_PREFIX + k: v for k, v in ldm.items()}, config)
    _assert_same(diffusers_back, want)
    _assert_same(sf.ldm_to_diffusers_unet(ldm, config), want)


def test_vae_round_trip_matches_diffusers_converter(models):
    want = _numpy(models[1])
    ldm = sf.diffusers_to_ldm_vae(want, VAE)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    # decoder levels run the other way: diffusers' up_blocks.1 (64 -> 32 channels) is LDM's up.1 of
    # three, up_blocks.0 is up.2; only the last level has no upsampler
    assert "decoder.up.1.block.0.nin_shortcut.weight" in ldm
    assert "encoder.down.2.block.0.nin_shortcut.weight" in ldm
    assert "decoder.up.2.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    diffusers_back = convert_ldm_vae_checkpoint({sf.VAE_PREFIX + k: v for k, v in ldm.items()}, VAE)
    _assert_same(diffusers_back, want)
    _assert_same(sf.ldm_to_diffusers_vae(ldm, VAE), want)


def _single_file(models, path: str, extra: dict = ()) -> str:
    unet, vae, clip = models
    ckpt = {sf.UNET_PREFIX + k: v for k, v in sf.diffusers_to_ldm_unet(_numpy(unet), UNET).items()}
    ckpt.update({sf.VAE_PREFIX + k: v for k, v in sf.diffusers_to_ldm_vae(_numpy(vae), VAE).items()})
    ckpt.update({sf.CLIP_PREFIX + k: v for k, v in _clip_sd(clip).items()})
    ckpt[sf.CLIP_PREFIX + "text_model.embeddings.position_ids"] = np.arange(16)[None]
    ckpt["alphas_cumprod"] = np.linspace(1, 0, 1000, dtype=np.float32)  # schedule buffers: dropped
    ckpt.update(dict(extra))
    common.write_safetensors(path, ckpt)
    return path


def test_split_and_convert_whole_file(models, tmp_path):
    path = _single_file(models, str(tmp_path / "sd.safetensors"))
    parts = sf.convert_single_file(path, UNET, VAE)
    _assert_same(parts["unet"], _numpy(models[0]))
    _assert_same(parts["vae"], _numpy(models[1]))
    _assert_same(parts["text_encoder"], _clip_sd(models[2]))
    raw = common.read_safetensors(path)
    _assert_same(parts["text_encoder"], convert_ldm_clip_checkpoint(
        {k: v for k, v in raw.items() if not k.endswith("position_ids")}))


def test_load_single_file_equals_folder_loaders(models, tmp_path):
    unet, vae, clip = models
    path = _single_file(models, str(tmp_path / "sd.safetensors"))
    loaded = sf.load_single_file(path, UNET, VAE, {**CLIP, "architectures": ["CLIPTextModel"]})
    from lcm_jax.convert.vae import load_vae
    vae.save_pretrained(str(tmp_path / "vae"))
    jax.tree.map(np.testing.assert_array_equal, loaded["vae"][1], load_vae(str(tmp_path / "vae"))[1])
    unet_mod = pytest.importorskip("lcm_jax.convert.unet")
    unet.save_pretrained(str(tmp_path / "unet"))
    jax.tree.map(np.testing.assert_array_equal, loaded["unet"][1],
                 unet_mod.load_unet(str(tmp_path / "unet"))[1])
    clip_mod = pytest.importorskip("lcm_jax.convert.clip")
    clip.save_pretrained(str(tmp_path / "text_encoder"))
    jax.tree.map(np.testing.assert_array_equal, loaded["text_encoder"][1],
                 clip_mod.load_text_encoder(str(tmp_path / "text_encoder"))[1])


def test_single_file_to_diffusers_folders_load_in_diffusers(models, tmp_path):
    path = _single_file(models, str(tmp_path / "sd.safetensors"))
    out = str(tmp_path / "pipe")
    sf.single_file_to_diffusers(path, out, UNET, VAE, {**CLIP, "architectures": ["CLIPTextModel"]})
    unet = TorchUNet.from_pretrained(os.path.join(out, "unet"))
    vae = TorchAutoencoderKL.from_pretrained(os.path.join(out, "vae"))
    _assert_same(_numpy(unet), _numpy(models[0]))
    _assert_same(_numpy(vae), _numpy(models[1]))


def test_use_ema_takes_the_ema_copy(models, tmp_path):
    unet_ldm = sf.diffusers_to_ldm_unet(_numpy(models[0]), UNET)
    ema = {sf._EMA_PREFIX + "diffusion_model" + k.replace(".", ""): v + 1 for k, v in unet_ldm.items()}
    path = _single_file(models, str(tmp_path / "sd.safetensors"), ema)
    parts = sf.convert_single_file(path, UNET, VAE, use_ema=True)
    _assert_same(parts["unet"], {k: v + 1 for k, v in _numpy(models[0]).items()})
    _assert_same(sf.convert_single_file(path, UNET, VAE)["unet"], _numpy(models[0]))


def test_errors_name_the_key(models, tmp_path):
    bad = _single_file(models, str(tmp_path / "bad.safetensors"),
                       {sf.UNET_PREFIX + "input_blocks.99.0.in_layers.0.weight": np.zeros(3, np.float32)})
    with pytest.raises(common.WeightsError, match=r"bad\.safetensors.*UNet keys.*input_blocks\.99\.0"):
        sf.convert_single_file(bad, UNET, VAE)
    wrong_config = {**VAE, "layers_per_block": 1}
    with pytest.raises(common.WeightsError, match=r"48 VAE keys .*decoder\.up\.0\.block\.2\.conv1"):
        sf.ldm_to_diffusers_vae(sf.diffusers_to_ldm_vae(_numpy(models[1]), VAE), wrong_config)
    vae_only = str(tmp_path / "vae_only.safetensors")
    common.write_safetensors(vae_only, {sf.VAE_PREFIX + "quant_conv.bias": np.zeros(8, np.float32)})
    with pytest.raises(common.WeightsError, match=r"not a Stable Diffusion 1\.x .*'unet', 'text_encoder'"):
        sf.convert_single_file(vae_only, UNET, VAE)
    no_ema = _single_file(models, str(tmp_path / "no_ema.safetensors"))
    with pytest.raises(common.WeightsError, match=r"use_ema=True .*model_ema\.diffusion_model"):
        sf.convert_single_file(no_ema, UNET, VAE, use_ema=True)
