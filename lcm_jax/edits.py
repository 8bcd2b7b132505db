"""img2img and inpainting: image and mask inputs, and the starting latents and per-step
conditioning they give a sampler, as diffusers' LatentConsistencyModelImg2ImgPipeline,
StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline.

Host side (numpy): `as_images` and `as_mask` check and normalize the inputs. Inside the jitted
sample (jnp): `start_latents` encodes the image, noises it to the first timestep and builds what
inpainting adds to every step: the mask blend of a 4-channel UNet, or the mask and masked-image
latents concatenated to the input of a 9-channel (SD inpainting) UNet.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.components import encode_images
from lcm_jax.sampling import MaskBlend

KINDS = ("img2img", "inpaint", "inpaint9")  # inpaint: a 4-channel UNet (mask blend)


def _as_array(x, what: str) -> np.ndarray:
    """A PIL image, a list of them, or an array, as a float32 array ([0, 255] ints scaled to [0, 1])."""
    if isinstance(x, (list, tuple)):
        return np.stack([_as_array(i, what) for i in x])
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL.Image
        x = np.asarray(x.convert("L" if what == "mask_image" else "RGB"))
    a = np.asarray(x)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255
    a = a.astype(np.float32)
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{what} values must be in [0, 1] (or uint8), got [{a.min():.3g}, {a.max():.3g}]")
    return a


def as_images(image, factor: int) -> np.ndarray:
    """(B, H, W, 3) float32 in [0, 1] from an array (H, W, 3) / (B, H, W, 3) in [0, 1] or uint8,
    or PIL image(s); H and W must be multiples of the VAE's downsampling factor."""
    a = _as_array(image, "image")
    a = a[None] if a.ndim == 3 else a
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) or (B, H, W, 3) RGB, got shape {a.shape}")
    if a.shape[1] % factor or a.shape[2] % factor:
        raise ValueError(f"image height and width must be multiples of {factor} (the VAE's downsampling "
                         f"factor), got {a.shape[1]}x{a.shape[2]}; crop or resize it")
    return a


def as_mask(mask_image, images: np.ndarray) -> np.ndarray:
    """(B, H, W, 1) float32 of 0 (keep) and 1 (repaint), binarized at 0.5 as diffusers' mask
    processor, from an array (H, W) / (B, H, W) / (B, H, W, 1) or PIL image(s) (grayscale)."""
    m = _as_array(mask_image, "mask_image")
    m = m[None] if m.ndim == 2 else m
    m = m[..., None] if m.ndim == 3 else m
    if m.ndim != 4 or m.shape[-1] != 1 or m.shape[1:3] != images.shape[1:3]:
        raise ValueError(f"mask_image must be (H, W), (B, H, W) or (B, H, W, 1) with the image's "
                         f"{images.shape[1]}x{images.shape[2]}, got shape {m.shape}")
    return (m >= 0.5).astype(np.float32)


def batched(a: np.ndarray, batch: int, what: str) -> np.ndarray:
    """`a` repeated to `batch` rows (one row for every prompt), as diffusers."""
    if a.shape[0] == batch:
        return a
    if batch % a.shape[0]:
        raise ValueError(f"{what} has {a.shape[0]} rows, which does not divide the {batch} prompts")
    return np.concatenate([a] * (batch // a.shape[0]))


def start_latents(kind: str, vae, vae_params, inputs: dict, noise: jax.Array, noised: Callable,
                  pure_noise: bool):
    """(starting latents, MaskBlend or None, extra UNet input channels or None) for an edit.

    `inputs`: image (B, H, W, 3) in [0, 1], posterior_noise (the image's encode), and for
    inpainting mask (B, H, W, 1) and, for 'inpaint9', masked_posterior_noise; `noise` has the
    latents' shape. `noised(z0, noise)` noises latents to the first timestep;
    `pure_noise` (inpainting at strength 1) starts from the noise itself, as diffusers.
    """
    pixels = 2.0 * inputs["image"] - 1.0
    z0 = None
    if kind != "inpaint9" or not pure_noise:
        z0 = encode_images(vae, vae_params, pixels, inputs["posterior_noise"])
    latents = noise if pure_noise else noised(z0, noise)
    if kind == "img2img":
        return latents, None, None
    mask = inputs["mask"]
    f = mask.shape[1] // latents.shape[1]
    small = mask[:, ::f, ::f]  # nearest-neighbour resize to the latents, as F.interpolate
    if kind == "inpaint":
        return latents, MaskBlend(z0, small, noise), None
    masked = encode_images(vae, vae_params, pixels * (mask < 0.5), inputs["masked_posterior_noise"])
    return latents, None, jnp.concatenate([small, masked], axis=-1)


def with_extra_channels(model_fn: Callable, extra: Optional[jax.Array]) -> Callable:
    """A UNet call that appends `extra` (B, h, w, c) to its input's channels (repeated for a CFG
    batch of 2B rows)."""
    if extra is None:
        return model_fn

    def fn(x, *args):
        reps = x.shape[0] // extra.shape[0]
        return model_fn(jnp.concatenate([x, jnp.concatenate([extra] * reps)], axis=-1), *args)

    return fn
