"""LCD of Stable Diffusion XL at 1024 px (diffusers' train_lcm_distill_sdxl_wds recipe).

    python -m lcm_jax.train --config=configs/sdxl_lcd.py:/path/to/stable-diffusion-xl-base-1.0 \
        --workdir=runs/sdxl_lcd --config.data.path=/path/to/image_folder

The argument is a diffusers SDXL pipeline folder (model_index.json, unet/, vae/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/); diffusers swaps in the fp16-safe
madebyollin/sdxl-vae-fp16-fix VAE, which can be copied over vae/. Each example is conditioned on
both encoders' penultimate states, the pooled text embeds and time_ids (1024, 1024, 0, 0, 1024,
1024) (diffusers' --use_fix_crop_and_size); the unconditional side is zeros. Diffusers' values:
batch 12, lr 1e-6 (constant after 500 warmup steps), w ~ U[3, 15], Huber loss, EMA 0.95, no weight
decay, 1000 steps. On a TPU pod add --config.mesh.fsdp=<devices>.
"""
from lcm_jax.defaults import lcd_recipe


def get_config(arg=None):
    c = lcd_recipe(arg or "checkpoints/stable-diffusion-xl-base-1.0", resolution=1024)
    c.batch_size = 12
    c.total_steps = 1000
    c.optim.learning_rate = 1e-6
    c.loss.w_min, c.loss.w_max = 3.0, 15.0
    c.checkpoint_every = 200
    c.sample_every = 200
    c.eval_every = 100
    return c
