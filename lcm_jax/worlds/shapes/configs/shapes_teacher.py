"""The shapes world's teacher: a small text-conditioned UNet on 8x8x4 latents, trained from scratch.

    python -m lcm_jax.train --config=lcm_jax/worlds/shapes/configs/shapes_teacher.py:runs/shapes_vae/components \
        --workdir=runs/shapes_teacher

The argument is the components folder written by `lcm_jax.worlds.shapes.train_vae` (VAE, frozen text encoder,
tokenizer, scheduler); `DIR,tiny` runs a few steps (tests). `python -m lcm_jax.worlds.shapes.build_teacher` runs
both and assembles lcm_jax/worlds/shapes/assets/teacher/.
"""
from lcm_jax.defaults import base_config
from lcm_jax.worlds.shapes import source as _source  # noqa: F401  (registers data.source 'shapes')
from lcm_jax.worlds.shapes.world import UNDERSTATED

DEFAULT_COMPONENTS = "runs/shapes_vae/components"
TEXT_HIDDEN = 64   # lcm_jax/worlds/shapes/configs/shapes_vae.py text_encoder.hidden_size
TEXT_LEN = 32      # the shapes tokenizer's model_max_length


def shapes_unet() -> dict:
    """Two levels (8x8, 4x4), cross-attention at both and in the middle; about 2.7M parameters (11 MB in fp32)."""
    return {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [64, 96],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": 4,            # diffusers' name for the number of heads here
        "cross_attention_dim": TEXT_HIDDEN, "norm_num_groups": 32,
    }


def get_config(arg=None):
    folder, _, variant = (arg or DEFAULT_COMPONENTS).partition(",")
    c = base_config()
    c.method = "diffusion"
    c.seed = 0
    c.model.teacher = ""
    c.model.components = folder
    c.model.unet = shapes_unet()
    c.model.time_cond_proj_dim = 0
    c.total_steps = 6000
    c.batch_size = 32      # not 64: on a 2-core CPU more updates beat bigger batches
    c.diffusion_ema_decay = 0.999   # the shipped UNet is the EMA of the weights
    c.log_every = 25
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.async_checkpointing = False
    c.sample_prompts = ["a large red circle in the center on a black background"]
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.data.source = "shapes"
    c.data.resolution = 64
    c.data.latent_size = 8
    c.data.text_len = TEXT_LEN
    c.data.caption_dropout = 0.1
    c.data.world_seed = 0
    c.data.understated = UNDERSTATED   # half the captions leave attributes out
    c.data.num_examples = 20000
    c.data.cache_size = 20000           # encode once with the frozen VAE: the step runs the UNet only
    if variant == "tiny":
        c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 4, 8, 2, 4
        c.optim.warmup_steps = 1
        c.data.num_examples, c.data.cache_size = 64, 32
    return c
