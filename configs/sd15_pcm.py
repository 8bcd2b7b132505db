"""Phased consistency (Wang et al. 2024) of Stable Diffusion 1.5: the LCD recipe with method 'pcm',
4 phases of the 50-step grid, and a slow evaluation EMA.

    python -m lcm_jax.train --config=configs/sd15_pcm.py:/path/to/stable-diffusion-v1-5 \
        --workdir=runs/sd15_pcm --config.data.path=/path/to/image_folder

Sampled deterministically at the phase edges: the TCD sampler at gamma 0 on
lcm_jax.schedules.pcm_timesteps(1000, 50, 4) = 999, 739, 499, 239 (one edge-to-edge step each).
"""
from lcm_jax.defaults import lcd_recipe


def get_config(arg=None):
    c = lcd_recipe(arg or "checkpoints/stable-diffusion-v1-5", resolution=512)
    c.method = "pcm"
    c.loss.pcm_phases = 4
    c.eval_ema_decay = 0.999
    return c
