"""Stable Diffusion's KL autoencoder (diffusers' `AutoencoderKL`) in Flax linen, NHWC.

Images in about [-1, 1] go to a diagonal Gaussian over latents at 1/2**(len(blocks) - 1) of the
resolution; latents go back to images. Latents here are *unscaled*: the caller multiplies by
`scaling_factor` (after subtracting `shift_factor`) before diffusion, and undoes it before
`decode`. Submodule names mirror diffusers' attributes so weights convert mechanically.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from lcm_jax.models.layers import (Downsample2D, ResnetBlock2D, Upsample2D, conv,
                                   dot_product_attention, group_norm)

Dtype = Any
_EPS = 1e-6  # every norm of diffusers' VAE encoder/decoder uses this epsilon

# Config keys this module reads, and the values it requires for keys it has no code for.
_USED_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
              "latent_channels", "norm_num_groups", "scaling_factor", "shift_factor",
              "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
_FIXED_KEYS = {"act_fn": ("silu",), "latents_mean": (None,), "latents_std": (None,)}
_INFO_KEYS = ("sample_size", "down_block_types", "up_block_types")  # checked or tiling-only


class DiagonalGaussian(struct.PyTreeNode):
    """The encoder's posterior N(mean, exp(logvar)) per latent element (NHWC)."""
    mean: jax.Array
    logvar: jax.Array  # clipped to [-30, 20] as in diffusers

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """mean + std * eps with eps ~ N(0, 1) drawn from `rng`."""
        noise = jax.random.normal(rng, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussian"] = None) -> jax.Array:
        """KL(self || other), other defaulting to N(0, 1); summed over (H, W, C) -> (B,)."""
        if other is None:
            terms = self.mean ** 2 + self.var - 1.0 - self.logvar
        else:
            terms = ((self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0
                     - self.logvar + other.logvar)
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


class VAEAttention(nn.Module):
    """Single-head self-attention over pixels with a group norm and a residual (diffusers' Attention)."""
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        hs = group_norm(self.groups, _EPS, self.dtype, name="group_norm")(x).reshape(b, h * w, 1, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(hs) for n in ("to_q", "to_k", "to_v"))
        out = dot_product_attention(q, k, v).reshape(b, h * w, c)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution (diffusers' UNetMidBlock2D)."""
    channels: int
    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _resnet(self.channels, self.groups, self.dtype, "resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.dtype, name="attentions_0")(x)
        return _resnet(self.channels, self.groups, self.dtype, "resnets_1")(x)


def _resnet(channels: int, groups: int, dtype: Dtype, name: str) -> ResnetBlock2D:
    return ResnetBlock2D(channels, groups=groups, eps=_EPS, use_temb=False, dtype=dtype, name=name)


class EncoderBlock(nn.Module):
    """diffusers' DownEncoderBlock2D: resnets, then a stride-2 conv (right/bottom padded)."""
    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = _resnet(self.channels, self.groups, self.dtype, f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class DecoderBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: resnets, then nearest 2x upsampling + conv."""
    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = _resnet(self.channels, self.groups, self.dtype, f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in) -> (B, H/f, W/f, 2 * latent) moments (mean, logvar) before quant_conv."""
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chans = self.block_out_channels
        x = conv(chans[0], dtype=self.dtype, name="conv_in")(x)
        for i, c in enumerate(chans):
            x = EncoderBlock(c, self.layers_per_block, self.groups, i < len(chans) - 1, self.dtype,
                             name=f"down_blocks_{i}")(x)
        x = MidBlock(chans[-1], self.groups, self.mid_block_add_attention, self.dtype,
                     name="mid_block")(x)
        x = nn.silu(group_norm(self.groups, _EPS, self.dtype, name="conv_norm_out")(x))
        return conv(2 * self.latent_channels, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent) after post_quant_conv -> image (B, h*f, w*f, out)."""
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        chans = tuple(reversed(self.block_out_channels))
        x = conv(chans[0], dtype=self.dtype, name="conv_in")(z)
        x = MidBlock(chans[0], self.groups, self.mid_block_add_attention, self.dtype,
                     name="mid_block")(x)
        for i, c in enumerate(chans):
            x = DecoderBlock(c, self.layers_per_block + 1, self.groups, i < len(chans) - 1,
                             self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(self.groups, _EPS, self.dtype, name="conv_norm_out")(x))
        return conv(self.out_channels, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL. `encode` -> DiagonalGaussian, `decode` -> image; NHWC.

    `scaling_factor`/`shift_factor` are carried for callers (diffusion runs on
    (z - shift) * scale); `force_upcast` says pipelines should run this VAE in float32.
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side: every block but the last halves the
        resolution (diffusers' vae_scale_factor, 8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Dtype = jnp.float32) -> "AutoencoderKL":
        """Builds the module from a diffusers AutoencoderKL config dict (config.json)."""
        kwargs = vae_kwargs_from_config(config)
        return cls(**kwargs, dtype=dtype)

    def setup(self) -> None:
        common = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                      mid_block_add_attention=self.mid_block_add_attention, dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, kernel=1, dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, kernel=1, dtype=self.dtype)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """(B, H, W, in_channels) images in about [-1, 1] -> posterior over unscaled latents."""
        moments = self.encoder(images)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, h, w, latent_channels) unscaled latents -> (B, H, W, out_channels) images."""
        if self.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        """Reconstruction: decode(sample) when `rng` is given, else decode(mode)."""
        posterior = self.encode(images)
        z = posterior.sample(rng) if rng is not None else posterior.mode()
        return self.decode(z)


def vae_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL fields from a diffusers config; ValueError naming any key it cannot honour."""
    unknown = [k for k in config if not k.startswith("_")
               and k not in _USED_KEYS + _INFO_KEYS + tuple(_FIXED_KEYS)]
    if unknown:
        raise ValueError(f"AutoencoderKL config has keys this implementation does not know: "
                         f"{sorted(unknown)}; remove them or extend lcm_jax/models/vae.py")
    for key, allowed in _FIXED_KEYS.items():
        if key in config and config[key] not in allowed:
            raise ValueError(f"AutoencoderKL config {key}={config[key]!r} is not supported "
                             f"(supported: {allowed})")
    n = len(config.get("block_out_channels", (64,)))
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(key, [block] * n))
        if types != [block] * n:
            raise ValueError(f"AutoencoderKL config {key}={types} is not supported: expected "
                             f"{n} x {block!r} (one per block_out_channels entry)")
    kwargs = {k: config[k] for k in _USED_KEYS if k in config}
    if "block_out_channels" in kwargs:
        kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return kwargs
