"""The shapes world's VAE (64x64x3 -> 8x8x4, SD's factor 8) and frozen text encoder.

    python -m lcm_jax.worlds.shapes.train_vae --config=lcm_jax/worlds/shapes/configs/shapes_vae.py --workdir=runs/shapes_vae

Writes runs/shapes_vae/components/, the folder lcm_jax/worlds/shapes/configs/shapes_teacher.py trains a UNet on.
`--config=lcm_jax/worlds/shapes/configs/shapes_vae.py:tiny` runs a few steps (tests).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 4000
    c.batch_size = 8
    c.log_every = 50

    c.vae = ml_collections.ConfigDict({
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8, "sample_size": 64,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 1.0,  # replaced by 1 / std of the trained latents
    })
    c.text_encoder = ml_collections.ConfigDict({
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "seed": 0,
        # caption -> per-cell attributes probe (lcm_jax/train_text_encoder.py); 0 leaves it random
        "pretrain_steps": 400, "pretrain_batch_size": 256, "pretrain_learning_rate": 3e-3,
        # the captions' rate of leaving attributes out (world.UNDERSTATED, as the teacher's data)
        "pretrain_understated": 0.5,
    })
    # Shapes cover a few percent of the pixels: weight them up, or the latent goes to the background.
    c.loss = ml_collections.ConfigDict({"reconstruction": "l1", "beta": 1e-6, "foreground_weight": 10.0})
    c.init_from = ""    # a components (or vae/) folder to continue training from
    c.optim = ml_collections.ConfigDict({
        "learning_rate": 2e-3, "warmup_steps": 50, "b1": 0.9, "b2": 0.99,
        "weight_decay": 0.0, "grad_clip": 1.0,
    })
    c.data = ml_collections.ConfigDict({
        "world_seed": 0, "num_images": 16384,  # training pool, rendered once
        "num_scale_images": 2048,             # for the latent scaling factor
        "num_eval_images": 500,              # held-out reconstructions for the classifier check
    })
    if arg == "tiny":
        c.total_steps, c.batch_size, c.log_every = 4, 4, 2
        c.data.num_images, c.data.num_scale_images, c.data.num_eval_images = 16, 16, 16
        c.text_encoder.pretrain_steps, c.text_encoder.pretrain_batch_size = 4, 8
    return c
