"""ControlNet (Zhang et al. 2023) for SD 1.x/2.x and SDXL UNets in Flax linen, NHWC.

diffusers' ControlNetModel is the encoder half of a UNet2DConditionModel (conv_in, the time and
SDXL text-time embeddings, the down blocks and the mid block) plus a small convolutional
embedding of the conditioning image added after conv_in, and one zero-initialised 1x1 conv per
skip connection and for the mid block's output. `ControlNetModel` is therefore a subclass of
`UNet2DConditionModel` that reuses its embeddings and blocks (same submodule names, so weights
convert as the UNet's) and returns the residuals the UNet adds to its skips and mid block
(`down_block_additional_residuals`, `mid_block_additional_residual`).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax.models import layers
from lcm_jax.models.unet import MidBlock, UNet2DConditionModel, UNetConfig

# ControlNet's own config keys and their diffusers defaults; the rest is a UNet's encoder config.
CONTROLNET_KEYS = {"conditioning_channels": 3, "controlnet_conditioning_channel_order": "rgb",
                   "conditioning_embedding_out_channels": (16, 32, 96, 256),
                   "global_pool_conditions": False}
_DOWN_TYPES = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)


def unet_config(cfg: Mapping[str, Any]) -> dict:
    """The UNet config whose encoder half a diffusers ControlNetModel config describes (the up
    blocks, which a ControlNet lacks, mirror the down blocks so that the config validates)."""
    order = cfg.get("controlnet_conditioning_channel_order", "rgb")
    if order not in ("rgb", "bgr"):
        raise ValueError(f"ControlNet config key 'controlnet_conditioning_channel_order' = {order!r} "
                         "is not supported (only 'rgb' or 'bgr')")
    if cfg.get("global_pool_conditions", False):
        raise ValueError("ControlNet config key 'global_pool_conditions' = True (a guess-mode-only "
                         "ControlNet, e.g. shuffle) is not supported by lcm-jax")
    out = {k: v for k, v in cfg.items() if k not in CONTROLNET_KEYS}
    down = out.get("down_block_types", _DOWN_TYPES)
    out["up_block_types"] = tuple(t.replace("Down", "Up") for t in reversed(down))
    return out


class ControlNetConditioningEmbedding(nn.Module):
    """The conditioning image (pixels) -> features at the latents' size: conv_in, pairs of
    (conv, stride-2 conv) with SiLU, and conv_out to the UNet's first block width."""
    out_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ch = self.block_out_channels
        conv = lambda f, name, stride=1: layers.conv(f, 3, stride=stride, padding=1, dtype=self.dtype,
                                                     name=name)
        h = nn.silu(conv(ch[0], "conv_in")(x))
        for i in range(len(ch) - 1):
            h = nn.silu(conv(ch[i], f"blocks_{2 * i}")(h))
            h = nn.silu(conv(ch[i + 1], f"blocks_{2 * i + 1}", stride=2)(h))
        return conv(self.out_channels, "conv_out")(h)


class ControlNetModel(UNet2DConditionModel):
    """diffusers' ControlNetModel (guess mode off): (down residuals, mid residual), each scaled
    by `conditioning_scale`, for a UNet whose encoder has the same layout."""
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr: bool = False   # controlnet_conditioning_channel_order 'bgr': the image's channels flipped

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], dtype: Any = jnp.float32,
                    remat: bool = False) -> "ControlNetModel":
        """Builds the module from a diffusers ControlNetModel config dict (validated)."""
        own = {**CONTROLNET_KEYS, **{k: v for k, v in cfg.items() if k in CONTROLNET_KEYS}}
        return cls(UNetConfig.from_diffusers(unet_config(cfg)), dtype=dtype, remat=remat,
                   conditioning_channels=int(own["conditioning_channels"]),
                   conditioning_embedding_out_channels=tuple(own["conditioning_embedding_out_channels"]),
                   bgr=own["controlnet_conditioning_channel_order"] == "bgr")

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, conditioning_scale: Any = 1.0,
                 added_cond_kwargs: Optional[Mapping[str, jax.Array]] = None,
                 ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """`controlnet_cond`: the conditioning image (B, H, W, C) in [0, 1] at the latents' size
        times 2^(len(conditioning_embedding_out_channels) - 1) (the VAE's factor, 8 for SD)."""
        cfg = self.config
        emb = self._embed_time(sample.shape[0], timesteps, None, added_cond_kwargs)
        context = jnp.asarray(encoder_hidden_states, self.dtype)
        cond = jnp.asarray(controlnet_cond, self.dtype)
        cond = cond[..., ::-1] if self.bgr else cond
        h = layers.conv(cfg.block_out_channels[0], cfg.conv_in_kernel, dtype=self.dtype,
                        name="conv_in")(jnp.asarray(sample, self.dtype))
        h = h + ControlNetConditioningEmbedding(cfg.block_out_channels[0],
                                                self.conditioning_embedding_out_channels,
                                                dtype=self.dtype, name="controlnet_cond_embedding")(cond)
        h, skips = self._down(h, emb, context)
        if cfg.mid_block_type is not None:
            h = self._block(MidBlock)(cfg, dtype=self.dtype, attention=self.attention,
                                      name="mid_block")(h, emb, context)
        zero_conv = lambda x, name: layers.conv(x.shape[-1], 1, dtype=self.dtype, name=name)(x)
        down = tuple(zero_conv(s, f"controlnet_down_blocks_{i}") * conditioning_scale
                     for i, s in enumerate(skips))
        return down, zero_conv(h, "controlnet_mid_block") * conditioning_scale
