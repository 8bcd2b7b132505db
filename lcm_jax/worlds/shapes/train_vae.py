"""Trains a small KL autoencoder on the shapes world and writes a pipeline *components* folder.

    python -m lcm_jax.worlds.shapes.train_vae --config=lcm_jax/worlds/shapes/configs/shapes_vae.py --workdir=runs/shapes_vae

The folder `workdir/components/` is a diffusers pipeline folder without unet/: vae/ (this run,
with scaling_factor = 1 / std of its latents, as Stable Diffusion chose 0.18215), text_encoder/
(a small CLIPTextModel, pretrained on the captions by
`lcm_jax.worlds.shapes.train_text_encoder` and then frozen), tokenizer/ (the
shapes tokenizer), scheduler/ (SD's LCMScheduler-compatible schedule) and model_index.json. A
teacher UNet is trained on top of it with `lcm_jax.train` (model.components). The workdir also
holds config.json, metrics.jsonl, vae_eval.json and reconstructions.png.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lcm_jax.worlds.shapes import world as shapes
from lcm_jax.worlds.shapes.autoencoder_loss import make_autoencoder_loss
from lcm_jax.models.vae import AutoencoderKL
from lcm_jax.training.metrics import progress_line
from lcm_jax.training.state import optimizer
from lcm_jax.worlds.shapes import TOKENIZER_DIR

# Stable Diffusion's noise schedule, in the form LCMScheduler / DDIMScheduler read.
SCHEDULER_CONFIG = {
    "_class_name": "LCMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
    "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
    "set_alpha_to_one": True, "steps_offset": 1, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False,
}


# =============================================================================================
# Input
# =============================================================================================


def make_image_pool(world_seed: int, num: int) -> np.ndarray:
    """The first `num` training images of the world (uint8, (num, 64, 64, 3)), rendered once."""
    images, _, _ = shapes.ShapesWorld(world_seed).batch(range(num))
    return images


def to_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [-1, 1] (the VAE's input range)."""
    return images.astype(np.float32) / 127.5 - 1.0


def batch_at(pool: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Batch `step`: a seeded draw without replacement from the pool (a function of the step)."""
    idx = np.random.default_rng([seed, step]).choice(len(pool), batch_size, replace=False)
    return to_pixels(pool[idx])


# =============================================================================================
# Update step
# =============================================================================================


def make_optimizer(oc: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
    """AdamW with linear warmup then cosine decay to 5% of the rate, clipped by global norm."""
    return optimizer(oc.learning_rate, total_steps, warmup_steps=oc.warmup_steps, schedule="cosine",
                     end_fraction=0.05, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay,
                     grad_clip=oc.grad_clip)


def make_train_step(vae: AutoencoderKL, config: ml_collections.ConfigDict, tx, lr_fn):
    """train_step(params, opt_state, images, step, rng) -> (params, opt_state, metrics); pure."""
    loss_fn = make_autoencoder_loss(vae, config.loss.reconstruction, config.loss.beta,
                                    config.loss.get("foreground_weight", 1.0))

    def train_step(params, opt_state, images, step, rng):
        rng = jax.random.fold_in(rng, step)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "reconstruction": jnp.mean(terms.reconstruction),
                   "kl": jnp.mean(terms.kl), "grad_norm": optax.global_norm(grads), "lr": lr_fn(step)}
        return params, opt_state, metrics

    return train_step


def initial_params(folder: str, like):
    """The VAE weights of `folder` (a diffusers vae/ folder, or a components/pipeline folder that
    holds one) to continue training from; they must fit the configured architecture."""
    from lcm_jax.convert.vae import load_vae

    path = os.path.join(folder, "vae") if os.path.isdir(os.path.join(folder, "vae")) else folder
    _, params = load_vae(path)
    want = jax.tree.map(lambda x: x.shape, like)
    have = jax.tree.map(lambda x: x.shape, params)
    if want != have:
        raise ValueError(f"init_from={folder!r}: its VAE does not match config.vae (different "
                         "block_out_channels or latent_channels); train from scratch instead")
    print(f"continuing from the VAE in {path}", flush=True)
    return params


def train(config: ml_collections.ConfigDict, workdir: str) -> tuple[AutoencoderKL, Any]:
    """Trains the VAE for config.total_steps; returns (module, params). Logs to metrics.jsonl."""
    vae = AutoencoderKL.from_config(config.vae.to_dict())
    pool = make_image_pool(config.data.world_seed, config.data.num_images)
    rng = jax.random.PRNGKey(config.seed)
    params = jax.jit(vae.init)(rng, jnp.zeros((1, 64, 64, 3)))["params"]
    if config.get("init_from"):
        params = initial_params(config.init_from, params)
    tx, lr_fn = make_optimizer(config.optim, config.total_steps)
    opt_state = tx.init(params)
    step_fn = jax.jit(make_train_step(vae, config, tx, lr_fn), donate_argnums=(0, 1))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    open(metrics_path, "w").close()
    t_last, step_last = time.time(), 0
    for step in range(config.total_steps):
        images = batch_at(pool, step, config.batch_size, config.seed)
        params, opt_state, metrics = step_fn(params, opt_state, images, step, rng)
        done = step + 1
        if done % config.log_every == 0 or done == config.total_steps:
            row = {k: float(v) for k, v in metrics.items()}
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"non-finite VAE loss at step {done}: {row}; lower "
                                         "optim.learning_rate")
            now = time.time()
            row["steps_per_s"] = (done - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": done, **row}) + "\n")
            print(progress_line(done, config.total_steps, row), flush=True)
    return vae, params


# =============================================================================================
# Scaling factor, evaluation
# =============================================================================================


def latent_scaling_factor(vae: AutoencoderKL, params, images: np.ndarray, rng: jax.Array,
                          batch: int = 256) -> float:
    """1 / std of posterior samples over `images` (uint8), so scaled latents have unit variance."""
    encode = jax.jit(lambda p, x, r: vae.apply({"params": p}, x, method="encode").sample(r))
    zs = [np.asarray(encode(params, to_pixels(images[s:s + batch]), jax.random.fold_in(rng, s)))
          for s in range(0, len(images), batch)]
    return float(1.0 / np.std(np.concatenate(zs)))


def reconstruct(vae: AutoencoderKL, params, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """decode(mode(encode(x))) of uint8 images, as float [0, 1] images."""
    fn = jax.jit(lambda p, x: vae.apply({"params": p}, x))
    out = [np.asarray(fn(params, to_pixels(images[s:s + batch]))) for s in range(0, len(images), batch)]
    return np.clip(np.concatenate(out) / 2 + 0.5, 0.0, 1.0)


def evaluate_reconstructions(vae: AutoencoderKL, params, num: int, out_png: str) -> dict:
    """Classifier prompt accuracy on held-out originals vs their reconstructions, MAE, a PNG."""
    from lcm_jax.evaluation.grids import save_grid
    from lcm_jax.worlds.shapes.evaluator import ShapesEvaluator

    images, captions, _ = shapes.ShapesWorld(shapes.EVAL_SEED).batch(range(num))
    recon = reconstruct(vae, params, images)
    evaluator = ShapesEvaluator()
    original = evaluator.prompt_accuracy(images, captions)
    rec = evaluator(recon, captions)
    grid = np.concatenate([images[:8] / 255.0, recon[:8], images[8:16] / 255.0, recon[8:16]])
    save_grid(grid, out_png, nrow=8, labels=["original", "recon", "original", "recon"])
    return {"num_images": num, "mae_0_255": float(np.abs(recon * 255 - images).mean()),
            "prompt_accuracy_original": original["prompt_accuracy"],
            "prompt_accuracy_reconstructed": rec["prompt_accuracy"], "fd_reconstructed": rec["fd"]}


# =============================================================================================
# Components folder
# =============================================================================================


def text_encoder_config(tc: ml_collections.ConfigDict, tokenizer) -> dict:
    """transformers CLIPTextConfig fields for a small CLIPTextModel over the shapes tokenizer."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": len(tokenizer), "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size, "projection_dim": tc.hidden_size,
        "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads,
        "max_position_embeddings": tokenizer.model_max_length, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "torch_dtype": "float32",
    }


def write_text_encoder(tc: ml_collections.ConfigDict, out_dir: str) -> None:
    """A CLIPTextModel in transformers' format: initialised with seed tc.seed, then pretrained
    on captions for tc.pretrain_steps steps (`lcm_jax.worlds.shapes.train_text_encoder`; 0: left random)."""
    from lcm_jax.convert.clip import load_tokenizer
    from lcm_jax.models.clip import CLIPTextModel
    from lcm_jax.worlds.shapes.train_text_encoder import pretrain, save_weights

    tokenizer = load_tokenizer(TOKENIZER_DIR)
    cfg = text_encoder_config(tc, tokenizer)
    module = CLIPTextModel.from_config(cfg)
    ids = jnp.zeros((1, cfg["max_position_embeddings"]), jnp.int32)
    params = module.init(jax.random.PRNGKey(tc.seed), ids)["params"]
    report = None
    if tc.get("pretrain_steps", 0):
        params, report = pretrain(tc, module, params, tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    save_weights(params, out_dir, report)


def model_index(unet: bool = False) -> dict:
    """diffusers' LatentConsistencyModelPipeline model_index.json (with or without unet/)."""
    index = {"_class_name": "LatentConsistencyModelPipeline", "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "LCMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if unet:
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
    return index


def write_components(config: ml_collections.ConfigDict, vae_params, scaling_factor: float,
                     out_dir: str) -> None:
    """Writes the components folder (everything a pipeline needs but the UNet) atomically."""
    from lcm_jax.convert.vae import vae_to_diffusers

    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    vae_to_diffusers(vae_params, {**config.vae.to_dict(), "scaling_factor": scaling_factor},
                     os.path.join(tmp, "vae"))
    write_text_encoder(config.text_encoder, os.path.join(tmp, "text_encoder"))
    shutil.copytree(TOKENIZER_DIR, os.path.join(tmp, "tokenizer"))
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump(model_index(unet=False), f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


# =============================================================================================
# Main
# =============================================================================================


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train, measure the scaling factor, write workdir/components, check reconstructions."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    t0 = time.time()
    vae, params = train(config, workdir)
    train_s = time.time() - t0
    pool = make_image_pool(config.data.world_seed, config.data.num_scale_images)
    scale = latent_scaling_factor(vae, params, pool, jax.random.PRNGKey(config.seed + 1))
    write_components(config, params, scale, os.path.join(workdir, "components"))
    report = {"train_seconds": train_s, "steps": config.total_steps, "scaling_factor": scale}
    report.update(evaluate_reconstructions(vae, params, config.data.num_eval_images,
                                           os.path.join(workdir, "reconstructions.png")))
    with open(os.path.join(workdir, "vae_eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("VAE: " + json.dumps(report), flush=True)
    return report


def main(argv) -> None:
    from absl import flags

    del argv
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "VAE config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory; components/ is written inside it")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
