"""LCD of Stable Diffusion 2.1 at 768 px (v-prediction: read from the teacher's scheduler config).

    python -m lcm_jax.train --config=configs/sd21_lcd.py:/path/to/stable-diffusion-2-1 \
        --workdir=runs/sd21_lcd --config.data.path=/path/to/image_folder
"""
from lcm_jax.defaults import lcd_recipe


def get_config(arg=None):
    c = lcd_recipe(arg or "checkpoints/stable-diffusion-2-1", resolution=768)
    c.mesh.data, c.mesh.fsdp = 1, -1  # 865M params + Adam + EMA: shard over every device
    return c
