"""LCD of Stable Diffusion 1.5 (the LCM paper's recipe; lcm_jax.defaults.lcd_recipe).

    python -m lcm_jax.train --config=configs/sd15_lcd.py:/path/to/stable-diffusion-v1-5 \
        --workdir=runs/sd15_lcd --config.data.path=/path/to/image_folder

The argument is a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/); the data folder holds images and a metadata.jsonl with captions. On a
TPU pod add --config.mesh.fsdp=<devices>: params, Adam state and the EMA target are split over
'fsdp'; the frozen teacher is stored in bfloat16.
"""
from lcm_jax.defaults import lcd_recipe


def get_config(arg=None):
    return lcd_recipe(arg or "checkpoints/stable-diffusion-v1-5", resolution=512)
