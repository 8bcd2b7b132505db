"""diffusers' AutoencoderTiny (TAESD, Bohan Ou 2023) in Flax linen, NHWC: a small convolutional
encoder/decoder that maps images to Stable Diffusion's scaled latents and back at a fraction of
AutoencoderKL's cost (previews, real-time sampling).

Submodule names mirror the PyTorch ones (`decoder.layers.3.conv.0` -> `decoder/layers_3/conv_0`),
so weights convert mechanically. The interface is AutoencoderKL's (`encode` -> a posterior,
`decode`, `scaling_factor`, `shift_factor`, `downsample_factor`, `latent_channels`), so the
pipeline uses either as its VAE.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax.models import layers
from lcm_jax.models.vae import DiagonalGaussian

_KEYS = ("in_channels", "out_channels", "encoder_block_out_channels", "decoder_block_out_channels",
         "latent_channels", "upsampling_scaling_factor", "num_encoder_blocks", "num_decoder_blocks",
         "latent_magnitude", "latent_shift", "scaling_factor", "shift_factor")
_FIXED = {"act_fn": "relu", "upsample_fn": "nearest", "force_upcast": False}
_INFO = ("block_out_channels",)   # diffusers registers the decoder's widths under this name too


class TinyBlock(nn.Module):
    """AutoencoderTinyBlock: relu(conv-relu-conv-relu-conv(x) + skip(x))."""
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda i: layers.conv(self.channels, 3, dtype=self.dtype, name=f"conv_{i}")
        h = conv(4)(nn.relu(conv(2)(nn.relu(conv(0)(x)))))
        if x.shape[-1] != self.channels:
            x = _NoBiasConv(self.channels, kernel=1, dtype=self.dtype, name="skip")(x)
        return nn.relu(h + x)


class _NoBiasConv(nn.Module):
    """A convolution without bias (TAESD's strided, post-upsampling and skip convolutions)."""
    features: int
    stride: int = 1
    kernel: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel
        w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                       jnp.float32)
        x, w = nn.dtypes.promote_dtype(x, w, dtype=self.dtype)
        return layers.conv2d(x, w, self.stride, k // 2)


class AutoencoderTiny(nn.Module):
    """diffusers' AutoencoderTiny; `encode` gives a point-mass posterior (std 0) over the same
    (unscaled, here = scaled) latents, `decode` images in about [-1, 1]."""
    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    scaling_factor: float = 1.0
    shift_factor: Optional[float] = 0.0
    dtype: Any = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (every encoder stage but the first halves)."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Any = jnp.float32) -> "AutoencoderTiny":
        """Builds the module from a diffusers AutoencoderTiny config dict; ValueError on options
        it does not implement."""
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _KEYS + _INFO + tuple(_FIXED))
        if unknown:
            raise ValueError(f"AutoencoderTiny config has keys lcm-jax does not know: {unknown}")
        for key, value in _FIXED.items():
            if config.get(key, value) != value:
                raise ValueError(f"AutoencoderTiny config {key}={config[key]!r} is not supported (only {value!r})")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in _KEYS}
        return cls(**kwargs, dtype=dtype)

    def setup(self) -> None:
        self.encoder = EncoderTiny(self.encoder_block_out_channels, self.num_encoder_blocks,
                                   self.latent_channels, dtype=self.dtype)
        self.decoder = DecoderTiny(self.decoder_block_out_channels, self.num_decoder_blocks,
                                   self.out_channels, self.upsampling_scaling_factor, dtype=self.dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction: decode(encode(images).mean)."""
        return self.decode(self.encode(images).mean)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """(B, H, W, 3) images in about [-1, 1] -> latents (a point-mass posterior: std 0)."""
        z = self.encoder(images)
        return DiagonalGaussian(z, jnp.full(z.shape, -jnp.inf, z.dtype))

    def decode(self, latents: jax.Array) -> jax.Array:
        """(B, h, w, latent_channels) latents -> (B, H, W, out_channels) images in about [-1, 1]."""
        return self.decoder(latents)


class EncoderTiny(nn.Module):
    """Per stage a conv (stride 2 after the first) and TinyBlocks; a conv to the latents."""
    block_out_channels: tuple[int, ...]
    num_blocks: tuple[int, ...]
    latent_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        h = (jnp.asarray(images, self.dtype) + 1) / 2
        i = 0
        for stage, (blocks, ch) in enumerate(zip(self.num_blocks, self.block_out_channels)):
            h = (layers.conv(ch, 3, dtype=self.dtype, name="layers_0") if stage == 0 else
                 _NoBiasConv(ch, stride=2, dtype=self.dtype, name=f"layers_{i}"))(h)
            for j in range(blocks):
                h = TinyBlock(ch, dtype=self.dtype, name=f"layers_{i + 1 + j}")(h)
            i += 1 + blocks
        return layers.conv(self.latent_channels, 3, dtype=self.dtype, name=f"layers_{i}")(h)


class DecoderTiny(nn.Module):
    """tanh-clamped latents, a conv, then per stage TinyBlocks and (but the last) nearest
    upsampling and a conv; the last stage's conv gives the image, mapped to [-1, 1]."""
    block_out_channels: tuple[int, ...]
    num_blocks: tuple[int, ...]
    out_channels: int
    upsampling_scaling_factor: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        h = jnp.tanh(jnp.asarray(latents, self.dtype) / 3) * 3
        h = nn.relu(layers.conv(self.block_out_channels[0], 3, dtype=self.dtype, name="layers_0")(h))
        i, n, f = 2, len(self.num_blocks), self.upsampling_scaling_factor  # layers_1: the ReLU
        for stage, (blocks, ch) in enumerate(zip(self.num_blocks, self.block_out_channels)):
            for j in range(blocks):
                h = TinyBlock(ch, dtype=self.dtype, name=f"layers_{i + j}")(h)
            i += blocks
            if stage == n - 1:
                h = layers.conv(self.out_channels, 3, dtype=self.dtype, name=f"layers_{i}")(h)
            else:  # layers_i: the upsampling
                h = _NoBiasConv(ch, dtype=self.dtype, name=f"layers_{i + 1}")(
                    jnp.repeat(jnp.repeat(h, f, axis=1), f, axis=2))
                i += 2
        return h * 2 - 1
