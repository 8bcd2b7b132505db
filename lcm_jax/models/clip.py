"""CLIP text encoders (linen): SD 1.x's CLIP ViT-L/14 and the OpenCLIP encoders of SD 2.x / SDXL.

Same computation and parameter names as transformers' `CLIPTextModel` and
`CLIPTextModelWithProjection` (pre-LayerNorm transformer, causal self-attention, pooling at the
end-of-text token), so `lcm_jax.convert.clip` maps their weights mechanically.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lcm_jax.models.layers import dot_product_attention

Dtype = jnp.dtype


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers CLIPTextConfig that the forward pass uses (defaults: theirs)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "CLIPTextConfig":
        """Reads a config.json dict (extra keys ignored) and checks the values that can be wrong."""
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in cfg.items() if k in names and v is not None})
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIP config: hidden_act {config.hidden_act!r} is not supported; "
                             f"use one of {sorted(_ACTIVATIONS)}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"CLIP config: hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        return config


@flax.struct.dataclass
class CLIPTextOutput:
    """Outputs named as transformers' (with output_hidden_states=True).

    hidden_states: the embeddings, then each layer's output (before the final LayerNorm);
    hidden_states[-2] is the penultimate layer SD 2.x / SDXL condition on.
    """
    last_hidden_state: jax.Array          # (B, N, hidden), after final_layer_norm
    hidden_states: tuple[jax.Array, ...]  # num_hidden_layers + 1 arrays (B, N, hidden)
    pooler_output: jax.Array              # (B, hidden), last_hidden_state at the EOS token
    text_embeds: Optional[jax.Array] = None  # (B, projection_dim), projection models only


def _layer_norm(config: CLIPTextConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch.nn.LayerNorm.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False,
                        name=name)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                             name="position_embedding")
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[-1]))[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        heads = c.num_attention_heads
        dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(t.shape[:2] + (heads, c.hidden_size // heads))
        q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        out = dot_product_attention(q, k, v, mask=mask)
        return dense("out_proj")(out.reshape(x.shape[:2] + (c.hidden_size,)))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Dense(c.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = _ACTIVATIONS[c.hidden_act](x)
        return nn.Dense(c.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = _layer_norm(self.config, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(h, mask)
        h = _layer_norm(self.config, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """The stack of encoder layers; returns every layer's output."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        outputs = []
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
            outputs.append(x)
        return tuple(outputs)


def attention_mask_for(input_ids: jax.Array,
                       attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """Boolean (B|1, 1, N, N) mask, True = attend: causal, and padding keys removed if given."""
    n = input_ids.shape[-1]
    mask = jnp.tril(jnp.ones((n, n), dtype=bool))[None, None]
    if attention_mask is not None:
        mask = mask & jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    return mask


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the token pooled per sequence, by transformers' rule.

    Configs with eos_token_id == 2 predate the fix of that id (SD 1.x / 2.x files): the pooled
    token is the largest id, which is <|endoftext|> in CLIP's vocabulary. Otherwise it is the first
    position holding eos_token_id (padding may use the same id).
    """
    ids = input_ids.astype(jnp.int32)
    if eos_token_id == 2:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nn.Module):
    """Embeddings -> encoder -> final LayerNorm, pooled at the EOS token."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array,
                 attention_mask: Optional[jax.Array] = None) -> CLIPTextOutput:
        c = self.config
        if input_ids.ndim != 2 or input_ids.shape[-1] > c.max_position_embeddings:
            raise ValueError(f"input_ids must be (batch, tokens) with at most "
                             f"{c.max_position_embeddings} tokens; got shape {input_ids.shape}")
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        mask = attention_mask_for(input_ids, attention_mask)
        layers = CLIPEncoder(c, self.dtype, name="encoder")(x, mask)
        last = _layer_norm(c, self.dtype, "final_layer_norm")(layers[-1] if layers else x)
        idx = eos_positions(input_ids, c.eos_token_id)
        pooled = jnp.take_along_axis(last, idx[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state=last, hidden_states=(x,) + layers,
                              pooler_output=pooled)


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel: the text encoder of SD 1.x / 2.x and SDXL's first encoder."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], dtype: Dtype = jnp.float32) -> "CLIPTextModel":
        """Builds the module from a transformers CLIPTextConfig dict (config.json)."""
        return cls(CLIPTextConfig.from_dict(cfg), dtype=dtype)

    @nn.compact
    def __call__(self, input_ids: jax.Array,
                 attention_mask: Optional[jax.Array] = None) -> CLIPTextOutput:
        return CLIPTextTransformer(self.config, self.dtype, name="text_model")(
            input_ids, attention_mask)


class CLIPTextModelWithProjection(nn.Module):
    """transformers' CLIPTextModelWithProjection (SDXL's second encoder): adds `text_embeds`."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any],
                    dtype: Dtype = jnp.float32) -> "CLIPTextModelWithProjection":
        """Builds the module from a transformers CLIPTextConfig dict (config.json)."""
        return cls(CLIPTextConfig.from_dict(cfg), dtype=dtype)

    @nn.compact
    def __call__(self, input_ids: jax.Array,
                 attention_mask: Optional[jax.Array] = None) -> CLIPTextOutput:
        out = CLIPTextTransformer(self.config, self.dtype, name="text_model")(
            input_ids, attention_mask)
        proj = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                        name="text_projection")
        return out.replace(text_embeds=proj(out.pooler_output))
