"""Trajectory consistency distillation (Zheng et al. 2024) of Stable Diffusion 1.5: the LCD recipe
with method 'tcd', an x0 student, sampler-weighted timesteps and a slow evaluation EMA.

    python -m lcm_jax.train --config=configs/sd15_tcd.py:/path/to/stable-diffusion-v1-5 \
        --workdir=runs/sd15_tcd --config.data.path=/path/to/image_folder
    lcm-jax export --workdir runs/sd15_tcd --out sd15_tcd   # sample with the TCD sampler (gamma)

The student maps z_t to z_s for an s below t on the skipping grid, in the semi-linear form
sqrt(abar_s) x0 + sqrt(1 - abar_s) eps (lcm_jax/losses/consistency.py).
"""
from lcm_jax.defaults import lcd_recipe


def get_config(arg=None):
    c = lcd_recipe(arg or "checkpoints/stable-diffusion-v1-5", resolution=512)
    c.method = "tcd"
    c.loss.student_prediction = "x0"
    c.loss.timestep_sampling = "sampler"
    c.eval_ema_decay = 0.999
    return c
