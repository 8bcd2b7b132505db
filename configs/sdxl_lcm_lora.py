"""LCM-LoRA for Stable Diffusion XL at 1024 px (diffusers' train_lcm_distill_lora_sdxl_wds recipe).

    python -m lcm_jax.train --config=configs/sdxl_lcm_lora.py:/path/to/stable-diffusion-xl-base-1.0 \
        --workdir=runs/sdxl_lora --config.data.path=/path/to/image_folder
    lcm-jax export --workdir runs/sdxl_lora --out lcm_lora_sdxl   # PEFT/diffusers safetensors

The argument is a diffusers SDXL pipeline folder (text_encoder_2/ and tokenizer_2/ included).
Rank 64, lr 1e-4, batch 12, w ~ U[3, 15] in the teacher's guided ODE only, time_ids
(1024, 1024, 0, 0, 1024, 1024), zeros for the unconditional side.
"""
from lcm_jax.defaults import lcm_lora_recipe


def get_config(arg=None):
    return lcm_lora_recipe(arg or "checkpoints/stable-diffusion-xl-base-1.0", resolution=1024)
