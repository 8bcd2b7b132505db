"""LCM-LoRA for Stable Diffusion 1.5 (diffusers' train_lcm_distill_lora_sd_wds recipe).

    python -m lcm_jax.train --config=configs/sd15_lcm_lora.py:/path/to/stable-diffusion-v1-5 \
        --workdir=runs/sd15_lora --config.data.path=/path/to/image_folder
    lcm-jax export --workdir runs/sd15_lora --out lcm_lora   # PEFT/diffusers safetensors

No w-embedding and no separate target network: the target is the same LoRA model under
stop-gradient; w ~ U[3, 15] only enters the teacher's guided ODE.
"""
from lcm_jax.defaults import lcm_lora_recipe


def get_config(arg=None):
    return lcm_lora_recipe(arg or "checkpoints/stable-diffusion-v1-5", resolution=512)
