"""The KL autoencoder's loss (Kingma & Welling 2014; Rombach et al. 2022, Sec. 3 and App. G).

    L(x) = rec(x, D(z)) + beta * KL(q(z | x) || N(0, I)),   z ~ q(z | x) = N(mu(x), sigma(x)^2)

with rec the per-pixel mean L1 (|x - x_hat|) or L2 ((x - x_hat)^2) error, optionally weighted
towards the foreground (below). Stable Diffusion's VAE
adds a perceptual and an adversarial term; for the flat-coloured shapes world a pixel loss is
enough. beta is small: the KL only keeps the latent scale bounded and the posterior smooth, and
the diffusion model works on latents rescaled by 1/std anyway.

Foreground weighting (`foreground_weight` > 1): pixels that differ from the image's background
colour (the per-channel median of its border) count `foreground_weight` times, and each image's
error is the weighted mean. In the shapes world the shapes cover a few percent of the pixels, so
an unweighted pixel loss spends the autoencoder's 8x8x4 latent on the flat background first and
reconstructs the shapes (what the captions describe) as coloured blobs.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

Params = Any
RECONSTRUCTION = ("l1", "l2")


@struct.dataclass
class AutoencoderTerms:
    """Per-example loss terms, each (B,)."""
    reconstruction: jax.Array  # mean over (H, W, C) of |x - x_hat| or (x - x_hat)^2
    kl: jax.Array              # KL(q(z|x) || N(0, I)) summed over the latent (h, w, c)
    loss: jax.Array            # reconstruction + beta * kl


def reconstruction_error(x: jax.Array, x_hat: jax.Array, kind: str,
                         weights: jax.Array | None = None) -> jax.Array:
    """Per-example (weighted) mean L1 or L2 error over (H, W, C): (B, H, W, C) x2 -> (B,);
    `weights` (B, H, W, 1) weigh pixels."""
    if kind not in RECONSTRUCTION:
        raise ValueError(f"reconstruction loss {kind!r} unknown; choose one of {RECONSTRUCTION}")
    diff = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
    err = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
    if weights is None:
        return jnp.mean(err, axis=(1, 2, 3))
    return jnp.sum(weights * err, axis=(1, 2, 3)) / (jnp.sum(weights, axis=(1, 2, 3)) * err.shape[-1])


def foreground_weights(x: jax.Array, weight: float, threshold: float = 0.05) -> jax.Array:
    """(B, H, W, C) images in [-1, 1] -> (B, H, W, 1) weights: `weight` where a pixel differs from
    the image's background colour (median of the border pixels) by more than `threshold` in some
    channel, 1 elsewhere."""
    border = jnp.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)  # (B, P, C)
    background = jnp.median(border, axis=1)[:, None, None, :]
    fg = jnp.max(jnp.abs(x - background), axis=-1, keepdims=True) > threshold
    return jnp.where(fg, weight, 1.0).astype(jnp.float32)


def make_autoencoder_loss(vae, reconstruction: str = "l1", beta: float = 1e-6,
                          foreground_weight: float = 1.0,
                          ) -> Callable[[Params, jax.Array, jax.Array], tuple[jax.Array, AutoencoderTerms]]:
    """Builds loss_fn(params, images (B,H,W,3) in [-1,1], rng) -> (mean loss, per-example terms)."""
    if reconstruction not in RECONSTRUCTION:
        raise ValueError(f"reconstruction loss {reconstruction!r} unknown; choose one of {RECONSTRUCTION}")

    def loss_fn(params, images, rng):
        # 1. ENCODE: the posterior q(z|x) and one reparameterised sample z = mu + sigma * eps
        posterior = vae.apply({"params": params}, images, method="encode")
        z = posterior.sample(rng)                                   # (B, h, w, c)
        # 2. RECONSTRUCTION LOSS
        x_hat = vae.apply({"params": params}, z, method="decode")   # (B, H, W, 3)
        w = None if foreground_weight == 1.0 else foreground_weights(images, foreground_weight)
        rec = reconstruction_error(images, x_hat, reconstruction, w)  # (B,)
        # 3. PRIOR (KL) LOSS
        kl = posterior.kl()                                         # (B,)
        terms = AutoencoderTerms(reconstruction=rec, kl=kl, loss=rec + beta * kl)
        return jnp.mean(terms.loss), terms

    return loss_fn
