"""A tiny random-weight diffusers LCM pipeline folder, built with diffusers/transformers PyTorch.

Shared by the pipeline, sampler-CLI and training tests: UNet with time_cond_proj_dim (or without,
for a teacher), VAE with SD's factor 8, CLIP text encoder, a character-level CLIP tokenizer, and
LCMScheduler. Every parameter gets noise on top of the default init so that all weights matter.
"""
from __future__ import annotations

import json
import os
import string

import torch

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
            cross_attention_dim=32, norm_num_groups=8)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=1, norm_num_groups=8, sample_size=64)
TEXT = dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
            pad_token_id=1, hidden_act="quick_gelu", projection_dim=32)


def write_char_tokenizer(folder: str, max_length: int = 16) -> None:
    """A CLIP-format tokenizer whose words are spelled out in characters (no merges needed)."""
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": max_length, "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}, f)


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


# SD 2.x's UNet layout: linear projections in the transformers, a head count per block (diffusers'
# attention_head_dim), upcast attention; its scheduler predicts v.
SD2_UNET = dict(UNET, attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True)
SD2_SCHEDULER = dict(prediction_type="v_prediction")


def build_pipeline(folder: str, time_cond_proj_dim: int | None = 32, seed: int = 0,
                   unet: dict | None = None, scheduler: dict | None = None):
    """Saves the pipeline to `folder` and returns the diffusers pipeline object; `unet` and
    `scheduler` override UNET and the LCMScheduler's arguments (e.g. SD2_UNET, SD2_SCHEDULER)."""
    from diffusers import (AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = _perturb(UNet2DConditionModel(**(unet or UNET), time_cond_proj_dim=time_cond_proj_dim), seed)
    vae = _perturb(AutoencoderKL(**VAE), seed + 1)
    text = _perturb(CLIPTextModel(CLIPTextConfig(**TEXT)), seed + 2)
    write_char_tokenizer(os.path.join(folder, "tokenizer"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1,
                         **(scheduler or {}))
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                          scheduler=sched, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def build_diffusers_test_pipeline(folder: str):
    """diffusers' own LatentConsistencyModelPipeline test components (its get_dummy_components):
    a VAE of two blocks, so it downsamples by 2, not 8; the character tokenizer stands in for the
    hub's tiny-random-clip. Saved to `folder`; returns the diffusers pipeline."""
    from diffusers import (AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        norm_num_groups=2, time_cond_proj_dim=32)
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=64, layer_norm_eps=1e-05,
        num_attention_heads=8, num_hidden_layers=3, pad_token_id=1, vocab_size=1000))
    write_char_tokenizer(os.path.join(folder, "tokenizer"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text.eval(), tokenizer=tok,
                                          unet=unet.eval(), scheduler=sched, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
