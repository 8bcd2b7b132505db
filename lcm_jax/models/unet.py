"""The Stable Diffusion UNet (SD 1.x, 2.x, SDXL; LCM's w-conditioned student) in Flax linen, NHWC.

Built from a diffusers `UNet2DConditionModel` config dict. Submodule names mirror the PyTorch
attributes (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` ->
`down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q`) so weights convert mechanically.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax.models import layers

Dtype = Any

# ---------------------------------------------------------------------------------------------
# Config: a diffusers config dict, validated and normalised to per-block tuples.
# ---------------------------------------------------------------------------------------------

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Keys that never change the network (bookkeeping, or options of block types we do not build).
_HARMLESS_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size",
    "addition_embed_type_num_heads",    # only for addition_embed_type='text_image'
    "mid_block_only_cross_attention",   # only for UNetMidBlock2DSimpleCrossAttn
})

# Keys we accept only at their diffusers default: any other value is a model we do not build.
_FIXED_KEYS = {
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
}

_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1.0, "dropout": 0.0,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None,
    "attention_head_dim": 8, "num_attention_heads": None, "use_linear_projection": False,
    "upcast_attention": False, "addition_embed_type": None, "addition_time_embed_dim": None,
    "time_embedding_dim": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None,
}


def _per_block(value, n: int, key: str) -> tuple:
    """An int/bool/None broadcast to n blocks, or a list checked to have n entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config {key}={value!r} has {len(value)} entries; expected one "
                             f"per down block ({n})")
        return tuple(value)
    return (value,) * n


def _per_layer(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """A validated diffusers UNet config with every per-block option spelled out per block."""
    in_channels: int
    out_channels: int
    center_input_sample: bool
    flip_sin_to_cos: bool
    freq_shift: float
    down_block_types: tuple[str, ...]
    mid_block_type: Optional[str]
    up_block_types: tuple[str, ...]
    block_out_channels: tuple[int, ...]
    layers_per_block: tuple[int, ...]
    transformer_layers_down: tuple[tuple[int, ...], ...]  # [block][layer]
    transformer_layers_up: tuple[tuple[int, ...], ...]    # [up block][layer]
    transformer_layers_mid: int
    num_heads: tuple[int, ...]
    cross_attention_dim: tuple[int, ...]
    only_cross_attention: tuple[bool, ...]
    use_linear_projection: bool
    norm_num_groups: int
    norm_eps: float
    downsample_padding: int
    mid_block_scale_factor: float
    dropout: float
    time_embed_dim: int
    time_cond_proj_dim: Optional[int]
    addition_embed_type: Optional[str]
    addition_time_embed_dim: Optional[int]
    conv_in_kernel: int
    conv_out_kernel: int
    source_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def to_diffusers(self) -> dict:
        """The diffusers config dict this was built from (for export)."""
        return json.loads(self.source_json)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> "UNetConfig":
        """Validates a diffusers `UNet2DConditionModel` config; unsupported options raise."""
        _check_keys(cfg)
        c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if k in _DEFAULTS}}
        n = len(c["block_out_channels"])
        _check_blocks(c, n)
        layers_per_block = tuple(int(x) for x in _per_block(c["layers_per_block"], n, "layers_per_block"))
        tlayers = _per_block(c["transformer_layers_per_block"], n, "transformer_layers_per_block")
        reverse = c["reverse_transformer_layers_per_block"] or tuple(reversed(tlayers))
        up_layers = tuple(reversed(layers_per_block))
        # diffusers' naming quirk: without num_attention_heads, attention_head_dim is the head count.
        heads = _per_block(c["num_attention_heads"] or c["attention_head_dim"], n, "num_attention_heads")
        return cls(
            in_channels=c["in_channels"], out_channels=c["out_channels"],
            center_input_sample=bool(c["center_input_sample"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            freq_shift=c["freq_shift"], down_block_types=tuple(c["down_block_types"]),
            mid_block_type=c["mid_block_type"], up_block_types=tuple(c["up_block_types"]),
            block_out_channels=tuple(c["block_out_channels"]), layers_per_block=layers_per_block,
            transformer_layers_down=tuple(_per_layer(t, m) for t, m in zip(tlayers, layers_per_block)),
            transformer_layers_up=tuple(_per_layer(t, m + 1) for t, m in zip(reverse, up_layers)),
            transformer_layers_mid=_per_layer(tlayers[-1], 1)[0],
            num_heads=tuple(int(h) for h in heads),
            cross_attention_dim=_per_block(c["cross_attention_dim"], n, "cross_attention_dim"),
            only_cross_attention=tuple(bool(x) for x in _per_block(c["only_cross_attention"], n,
                                                                    "only_cross_attention")),
            use_linear_projection=bool(c["use_linear_projection"]),
            norm_num_groups=c["norm_num_groups"], norm_eps=c["norm_eps"],
            downsample_padding=c["downsample_padding"], mid_block_scale_factor=c["mid_block_scale_factor"],
            dropout=c["dropout"], time_embed_dim=c["time_embedding_dim"] or 4 * c["block_out_channels"][0],
            time_cond_proj_dim=c["time_cond_proj_dim"], addition_embed_type=c["addition_embed_type"],
            addition_time_embed_dim=c["addition_time_embed_dim"], conv_in_kernel=c["conv_in_kernel"],
            conv_out_kernel=c["conv_out_kernel"], source_json=json.dumps(dict(cfg), sort_keys=True))


def _check_keys(cfg: Mapping[str, Any]) -> None:
    for key, value in cfg.items():
        if key in _HARMLESS_KEYS or key in _DEFAULTS:
            continue
        if key not in _FIXED_KEYS:
            raise ValueError(f"UNet config key {key!r} (= {value!r}) is not supported by lcm-jax")
        if value != _FIXED_KEYS[key]:
            raise ValueError(f"UNet config key {key!r} = {value!r} is not supported by lcm-jax "
                             f"(only {_FIXED_KEYS[key]!r})")
    if cfg.get("act_fn", "silu") not in ("silu", "swish"):
        raise ValueError(f"UNet config key 'act_fn' = {cfg['act_fn']!r} is not supported (only 'silu')")
    if cfg.get("norm_num_groups", 32) is None:
        raise ValueError("UNet config key 'norm_num_groups' = None is not supported (use an int)")
    emb = cfg.get("addition_embed_type")
    if emb not in (None, "text_time"):
        raise ValueError(f"UNet config key 'addition_embed_type' = {emb!r} is not supported "
                         "(only None or 'text_time')")
    if emb == "text_time" and not (cfg.get("addition_time_embed_dim")
                                   and cfg.get("projection_class_embeddings_input_dim")):
        raise ValueError("UNet config with addition_embed_type='text_time' needs "
                         "addition_time_embed_dim and projection_class_embeddings_input_dim")


def _check_blocks(c: Mapping[str, Any], n: int) -> None:
    for key, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
        if len(c[key]) != n:
            raise ValueError(f"UNet config {key} has {len(c[key])} entries but block_out_channels "
                             f"has {n}")
        bad = [t for t in c[key] if t not in allowed]
        if bad:
            raise ValueError(f"UNet config key {key!r}: block type(s) {bad} not supported "
                             f"(only {allowed})")
    if c["mid_block_type"] not in _MID_TYPES:
        raise ValueError(f"UNet config key 'mid_block_type' = {c['mid_block_type']!r} is not "
                         f"supported (only {_MID_TYPES})")


# ---------------------------------------------------------------------------------------------
# Transformer blocks.
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names: to_q/to_k/to_v (no bias), to_out_0."""
    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"   # layers.dot_product_attention's implementation

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        context = x if context is None else context
        inner = self.heads * self.head_dim
        dense = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
        q, k, v = split(dense("to_q")(x)), split(dense("to_k")(context)), split(dense("to_v")(context))
        out = layers.dot_product_attention(q, k, v, implementation=self.attention)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """proj -> (value, gate) halves -> value * gelu(gate) (exact, erf-based gelu as torch)."""
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, -1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """net_0 (GEGLU to 4x width) -> net_2 (linear back)."""
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention (or cross-only), cross-attention and GEGLU feed-forward."""
    heads: int
    head_dim: int
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False,
                                         name=name)
        attn = lambda name: Attention(self.heads, self.head_dim, dtype=self.dtype,
                                      attention=self.attention, name=name)
        x = x + attn("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in (1x1 conv or linear) -> transformer blocks -> proj_out, + residual."""
    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        inner = self.heads * self.head_dim
        proj = lambda name, f: (nn.Dense(f, dtype=self.dtype, name=name) if self.use_linear_projection
                                else layers.conv(f, kernel=1, dtype=self.dtype, name=name))
        h = layers.group_norm(self.groups, 1e-6, self.dtype, name="norm")(x)
        h = proj("proj_in", inner)(h).reshape(b, hgt * wid, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, self.only_cross_attention,
                                      dtype=self.dtype, attention=self.attention,
                                      name=f"transformer_blocks_{i}")(h, context)
        h = proj("proj_out", c)(h.reshape(b, hgt, wid, inner))
        return h + x


# ---------------------------------------------------------------------------------------------
# UNet blocks.
# ---------------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with `transformer_layers`) or DownBlock2D (without)."""
    cfg: UNetConfig
    index: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, h, temb, context):
        cfg, i = self.cfg, self.index
        out_ch = cfg.block_out_channels[i]
        skips = []
        for j in range(cfg.layers_per_block[i]):
            h = layers.ResnetBlock2D(out_ch, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                                     dropout=cfg.dropout, dtype=self.dtype, name=f"resnets_{j}")(h, temb)
            if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
                h = _transformer(cfg, i, cfg.transformer_layers_down[i][j], self.dtype,
                                 f"attentions_{j}", attention=self.attention)(h, context)
            skips.append(h)
        if i < len(cfg.block_out_channels) - 1:
            h = layers.Downsample2D(out_ch, padding=cfg.downsample_padding, dtype=self.dtype,
                                    name="downsamplers_0")(h)
            skips.append(h)
        return h, tuple(skips)


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""
    cfg: UNetConfig
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, h, temb, context):
        cfg = self.cfg
        resnet = lambda name: layers.ResnetBlock2D(
            cfg.block_out_channels[-1], groups=cfg.norm_num_groups, eps=cfg.norm_eps,
            dropout=cfg.dropout, output_scale_factor=cfg.mid_block_scale_factor, dtype=self.dtype,
            name=name)
        h = resnet("resnets_0")(h, temb)
        h = _transformer(cfg, -1, cfg.transformer_layers_mid, self.dtype, "attentions_0",
                         only_cross=False, attention=self.attention)(h, context)
        return resnet("resnets_1")(h, temb)


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D or UpBlock2D: each resnet eats one skip (last first); then upsample.

    `upsample_like` is the next level's skip: upsampling goes to its height and width, which is
    2x except where the latent size was not divisible by the downsampling factor.
    """
    cfg: UNetConfig
    index: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, h, skips, temb, context, upsample_like=None):
        cfg, i = self.cfg, self.index
        n = len(cfg.block_out_channels)
        out_ch = tuple(reversed(cfg.block_out_channels))[i]
        block = n - 1 - i  # the matching down block, for per-block options
        for j, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
            h = layers.ResnetBlock2D(out_ch, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                                     dropout=cfg.dropout, dtype=self.dtype, name=f"resnets_{j}")(h, temb)
            if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
                h = _transformer(cfg, block, cfg.transformer_layers_up[i][j], self.dtype,
                                 f"attentions_{j}", attention=self.attention)(h, context)
        if upsample_like is not None:
            h = layers.Upsample2D(out_ch, dtype=self.dtype, name="upsamplers_0")(
                h, output_size=upsample_like.shape[1:3])
        return h


def _transformer(cfg: UNetConfig, block: int, num_layers: int, dtype: Dtype, name: str,
                 only_cross: Optional[bool] = None, attention: str = "auto") -> Transformer2DModel:
    channels, heads = cfg.block_out_channels[block], cfg.num_heads[block]
    return Transformer2DModel(
        heads, channels // heads, num_layers=num_layers, groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        only_cross_attention=cfg.only_cross_attention[block] if only_cross is None else only_cross,
        dtype=dtype, attention=attention, name=name)


# ---------------------------------------------------------------------------------------------
# The UNet.
# ---------------------------------------------------------------------------------------------


def _add_residuals(skips: list, residuals: Sequence[jax.Array]) -> list:
    if len(residuals) != len(skips):
        raise ValueError(f"down_block_additional_residuals has {len(residuals)} arrays; this UNet has "
                         f"{len(skips)} skip connections (is the ControlNet made for another UNet?)")
    return [s + r.astype(s.dtype) for s, r in zip(skips, residuals)]


class UNet2DConditionModel(nn.Module):
    """diffusers' UNet2DConditionModel on NHWC latents; returns the prediction (eps/v), NHWC.

    dtype is the compute dtype (params may be fp32 or bf16); remat wraps every block in
    `nn.remat` to trade compute for activation memory in training; attention picks
    `layers.dot_product_attention`'s implementation ('auto', 'xla', 'chunked', 'blocked', 'cudnn').
    """
    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], dtype: Dtype = jnp.float32,
                    remat: bool = False) -> "UNet2DConditionModel":
        """Builds the module from a diffusers config dict (validated; unsupported keys raise)."""
        return cls(UNetConfig.from_diffusers(cfg), dtype=dtype, remat=remat)

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 timestep_cond: Optional[jax.Array] = None,
                 added_cond_kwargs: Optional[Mapping[str, jax.Array]] = None,
                 down_block_additional_residuals: Optional[Sequence[jax.Array]] = None,
                 mid_block_additional_residual: Optional[jax.Array] = None) -> jax.Array:
        """The residuals (a ControlNet's) are added to the skip connections and to the mid
        block's output, as diffusers."""
        cfg = self.config
        emb = self._embed_time(sample.shape[0], timesteps, timestep_cond, added_cond_kwargs)
        context = jnp.asarray(encoder_hidden_states, self.dtype)
        h = jnp.asarray(sample, self.dtype)
        if cfg.center_input_sample:
            h = 2 * h - 1.0
        h = layers.conv(cfg.block_out_channels[0], cfg.conv_in_kernel, dtype=self.dtype,
                        name="conv_in")(h)
        h, skips = self._down(h, emb, context)
        if down_block_additional_residuals is not None:
            skips = _add_residuals(skips, down_block_additional_residuals)
        if cfg.mid_block_type is not None:
            h = self._block(MidBlock)(cfg, dtype=self.dtype, attention=self.attention,
                                      name="mid_block")(h, emb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(h.dtype)
        h = self._up(h, skips, emb, context)
        h = nn.silu(layers.group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype,
                                      name="conv_norm_out")(h))
        return layers.conv(cfg.out_channels, cfg.conv_out_kernel, dtype=self.dtype, name="conv_out")(h)

    def _block(self, cls):
        return nn.remat(cls) if self.remat else cls

    def _down(self, h, emb, context):
        skips = [h]
        for i in range(len(self.config.down_block_types)):
            h, res = self._block(DownBlock)(self.config, i, dtype=self.dtype, attention=self.attention,
                                            name=f"down_blocks_{i}")(h, emb, context)
            skips.extend(res)
        return h, skips

    def _up(self, h, skips, emb, context):
        for i in range(len(self.config.up_block_types)):
            n = self.config.layers_per_block[-1 - i] + 1
            res, skips = skips[-n:], skips[:-n]
            like = skips[-1] if skips else None
            h = self._block(UpBlock)(self.config, i, dtype=self.dtype, attention=self.attention,
                                     name=f"up_blocks_{i}")(h, tuple(res), emb, context, like)
        return h

    def _embed_time(self, batch: int, timesteps, timestep_cond, added_cond_kwargs) -> jax.Array:
        cfg = self.config
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        t_emb = layers.timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                          cfg.freq_shift).astype(self.dtype)
        if timestep_cond is not None and cfg.time_cond_proj_dim is None:
            raise ValueError("timestep_cond was given but this UNet has no time_cond_proj_dim "
                             "(it is not w-conditioned); pass timestep_cond=None")
        cond = None if timestep_cond is None else jnp.asarray(timestep_cond, self.dtype)
        emb = layers.TimestepEmbedding(cfg.time_embed_dim, cond_proj_dim=cfg.time_cond_proj_dim,
                                       dtype=self.dtype, name="time_embedding")(t_emb, cond)
        if cfg.addition_embed_type == "text_time":
            emb = emb + self._embed_text_time(batch, added_cond_kwargs)
        return emb

    def _embed_text_time(self, batch: int, added: Optional[Mapping[str, jax.Array]]) -> jax.Array:
        """SDXL micro-conditioning: pooled text embeds ++ sinusoidal(time_ids) -> add_embedding."""
        cfg = self.config
        if not added or "text_embeds" not in added or "time_ids" not in added:
            raise ValueError("this UNet has addition_embed_type='text_time': pass added_cond_kwargs="
                             "{'text_embeds': (batch, dim), 'time_ids': (batch, 6)}")
        time_ids = jnp.asarray(added["time_ids"], jnp.float32).reshape(-1)
        time_emb = layers.timestep_embedding(time_ids, cfg.addition_time_embed_dim,
                                             cfg.flip_sin_to_cos, cfg.freq_shift).reshape(batch, -1)
        add = jnp.concatenate([jnp.asarray(added["text_embeds"], jnp.float32), time_emb], axis=-1)
        return layers.TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype,
                                        name="add_embedding")(add.astype(self.dtype))
