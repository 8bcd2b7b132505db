"""The parts of a diffusers pipeline folder, and what both training and sampling do with them:
load the folder, encode prompts (SD 1.x/2.x and SDXL), SDXL micro-conditioning, decode latents.

The pipeline (`lcm_jax.pipeline`) and the trainer (`lcm_jax.training`) both build on this module
and never on each other.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import hub, schedules
from lcm_jax.convert.clip import load_text_encoder, load_tokenizer
from lcm_jax.convert.common import WeightsError
from lcm_jax.convert.unet import load_unet
from lcm_jax.convert.vae import load_vae


@dataclasses.dataclass
class Components:
    """The loaded parts of a diffusers pipeline folder."""
    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_params: Any
    tokenizer: Any
    schedule: schedules.NoiseSchedule
    scheduler_config: dict
    text_encoder_2: Any = None      # SDXL's second CLIP encoder (with projection); None for SD 1/2
    text_params_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: CFG without a negative prompt uses zeros
    controlnet: Any = None          # a ControlNetModel beside the folder's UNet (its own folder)
    controlnet_params: Any = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def read_json(path: str, what: str) -> dict:
    """A JSON file, or a WeightsError naming the file and what is wrong with it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise WeightsError(f"{path} not found: {what}") from e
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); {what}") from e


def load_components(folder: str, dtype=jnp.float32, variant: Optional[str] = None,
                    with_unet: bool = True) -> Components:
    """Loads unet/, vae/, text_encoder/, tokenizer/ and scheduler/ of a diffusers pipeline folder
    (and text_encoder_2/, tokenizer_2/ when model_index.json names them: SDXL).

    with_unet=False loads everything but the UNet (a teacher trained from scratch on top of an
    existing VAE and text encoder); the unet fields are then None. A gs:// folder is read from
    its local copy (`fs.local_copy`: downloaded once per host); a Hugging Face Hub id
    "org/name" from the Hub cache (`hub.local_folder`).
    """
    folder = hub.local_folder(folder, variant)
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        raise WeightsError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json "
                           "(expected subfolders unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    parts = read_json(os.path.join(folder, "model_index.json"), "a pipeline folder needs one")
    sched_cfg = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"),
                          "a pipeline folder needs scheduler/")
    unet, up = (load_unet(os.path.join(folder, "unet"), dtype=dtype, variant=variant)
                if with_unet else (None, None))
    vae, vp = load_vae(os.path.join(folder, "vae"), dtype=dtype, variant=variant)
    te, tp = load_text_encoder(os.path.join(folder, "text_encoder"), dtype=dtype, variant=variant)
    tok = load_tokenizer(os.path.join(folder, "tokenizer"))
    sdxl = {}
    if all((parts.get(k) or [None])[0] for k in ("text_encoder_2", "tokenizer_2")):
        te2, tp2 = load_text_encoder(os.path.join(folder, "text_encoder_2"), dtype=dtype, variant=variant)
        sdxl = dict(text_encoder_2=te2, text_params_2=tp2,
                    tokenizer_2=load_tokenizer(os.path.join(folder, "tokenizer_2")),
                    force_zeros_for_empty_prompt=bool(parts.get("force_zeros_for_empty_prompt", True)))
    return Components(unet, up, vae, vp, te, tp, tok,
                      schedules.NoiseSchedule.from_scheduler_config(sched_cfg), sched_cfg, **sdxl)


def load_any_vae(path: str, dtype=jnp.float32, variant: Optional[str] = None) -> tuple[Any, Any]:
    """A diffusers AutoencoderKL or AutoencoderTiny (TAESD) folder, or a Hub id of one, by its
    config's _class_name: (module, params)."""
    from lcm_jax.convert.taesd import load_taesd

    folder = hub.local_folder(path, variant)
    cls = read_json(os.path.join(folder, "config.json"), "a VAE folder needs one").get("_class_name")
    return (load_taesd if cls == "AutoencoderTiny" else load_vae)(folder, dtype=dtype, variant=variant)


def with_vae(components: Components, vae, vae_params, source: str) -> Components:
    """`components` decoding (and encoding) with another VAE of the same latent space."""
    old = components.vae
    for key in ("latent_channels", "downsample_factor"):
        if getattr(vae, key) != getattr(old, key):
            raise WeightsError(f"{source}: the VAE's {key} is {getattr(vae, key)}, the pipeline's "
                               f"{getattr(old, key)}; it is not a VAE of this model's latent space")
    return dataclasses.replace(components, vae=vae, vae_params=vae_params)


def text_embeddings(text_encoder, params, ids: jax.Array) -> tuple[jax.Array, None]:
    """SD 1.x/2.x prompt conditioning: CLIP's last hidden state (B, L, D); no pooled embeds."""
    return text_encoder.apply({"params": params}, ids).last_hidden_state, None


def sdxl_text_embeddings(te1, params1, te2, params2, ids1: jax.Array,
                         ids2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """SDXL's prompt conditioning from both encoders' token ids: their penultimate hidden states
    concatenated on the feature axis (B, L, D1 + D2), and the second encoder's projected pooled
    output (B, P) that feeds the UNet's add_embedding."""
    h1 = te1.apply({"params": params1}, ids1).hidden_states[-2]
    out2 = te2.apply({"params": params2}, ids2)
    return jnp.concatenate([h1, out2.hidden_states[-2]], axis=-1), out2.text_embeds


def sdxl_time_ids(batch: int, height: int, width: int) -> np.ndarray:
    """SDXL micro-conditioning (original size, crop top-left, target size) = (h, w, 0, 0, h, w)."""
    return np.tile(np.asarray([height, width, 0, 0, height, width], np.float32), (batch, 1))


def decode_latents(vae, vae_params, z: jax.Array) -> jax.Array:
    """Scaled latents -> images in [0, 1] (undo scaling/shift, decode, (x + 1) / 2, clip)."""
    z = z / vae.scaling_factor + (vae.shift_factor or 0.0)
    image = vae.apply({"params": vae_params}, z, method="decode")
    return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def encode_images(vae, vae_params, pixels: jax.Array, noise: jax.Array) -> jax.Array:
    """Pixels in [-1, 1] (B, H, W, 3) -> scaled latents, the posterior sampled with `noise`
    (mean + std * noise, as diffusers' retrieve_latents given that draw)."""
    post = vae.apply({"params": vae_params}, pixels, method="encode")
    z = post.mean + post.std * noise.astype(post.mean.dtype)
    return ((z - (vae.shift_factor or 0.0)) * vae.scaling_factor).astype(jnp.float32)
