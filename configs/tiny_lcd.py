"""Tiny LCD: a random-init two-level teacher and synthetic latents; the whole loop in seconds on CPU.

    python -m lcm_jax.train --config=configs/tiny_lcd.py --workdir=runs/tiny_lcd

Used by the tests and CI. `--config=configs/tiny_lcd.py:lora` runs LCM-LoRA on the same teacher;
`:tcd` and `:pcm` trajectory and phased consistency distillation.
"""
from lcm_jax.defaults import base_config, tiny_unet


def get_config(arg=None):
    c = base_config()
    c.method = {None: "lcd", "": "lcd", "lcd": "lcd", "lora": "lcm_lora", "lcf": "lcf",
                "diffusion": "diffusion", "tcd": "tcd", "pcm": "pcm"}[arg]
    c.total_steps = 50
    c.batch_size = 8
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 25
    c.async_checkpointing = False
    c.model.unet = tiny_unet()
    c.model.time_cond_proj_dim = 32
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.data.source = "synthetic"
    c.data.latent_size = 8
    c.data.text_len = 8
    return c
