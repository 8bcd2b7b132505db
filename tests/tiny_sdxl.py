"""A tiny random-weight diffusers SDXL pipeline folder, built with diffusers/transformers PyTorch.

Two CLIP text encoders (the second with projection, as SDXL's OpenCLIP bigG), two copies of the
character tokenizer, a UNet with SDXL's micro-conditioning (addition_embed_type 'text_time') and
a transformer depth per block, the tiny VAE of tiny_pipeline, and an LCM or DDIM scheduler.
"""
from __future__ import annotations

import os

from tiny_pipeline import TEXT, VAE, _perturb, write_char_tokenizer

TEXT_2 = dict(TEXT, hidden_size=48, intermediate_size=96, projection_dim=16, hidden_act="gelu")
TIME_DIM = 8
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
            transformer_layers_per_block=[1, 2], use_linear_projection=True, norm_num_groups=8,
            cross_attention_dim=TEXT["hidden_size"] + TEXT_2["hidden_size"],
            addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=6 * TIME_DIM + TEXT_2["projection_dim"])
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1)


def build_sdxl_pipeline(folder: str, time_cond_proj_dim: int | None = 32, scheduler: str = "lcm",
                        seed: int = 0):
    """Saves an SDXL pipeline to `folder` and returns the diffusers StableDiffusionXLPipeline."""
    from diffusers import (AutoencoderKL, DDIMScheduler, LCMScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer)
    import torch

    torch.manual_seed(seed)
    unet = _perturb(UNet2DConditionModel(**UNET, time_cond_proj_dim=time_cond_proj_dim), seed)
    vae = _perturb(AutoencoderKL(**VAE, scaling_factor=0.13025), seed + 1)
    text = _perturb(CLIPTextModel(CLIPTextConfig(**TEXT)), seed + 2)
    text_2 = _perturb(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)), seed + 3)
    toks = []
    for name in ("tokenizer", "tokenizer_2"):
        write_char_tokenizer(os.path.join(folder, name))
        toks.append(CLIPTokenizer.from_pretrained(os.path.join(folder, name)))
    sched = {"lcm": LCMScheduler, "ddim": DDIMScheduler}[scheduler](**SCHEDULE)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2,
                                     tokenizer=toks[0], tokenizer_2=toks[1], unet=unet,
                                     scheduler=sched, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
