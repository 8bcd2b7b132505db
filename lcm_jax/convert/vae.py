"""diffusers `AutoencoderKL` folders <-> lcm-jax `AutoencoderKL` params."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from lcm_jax.convert import common
from lcm_jax.models.vae import AutoencoderKL

# Attention names of checkpoints saved before diffusers 0.14 (and of `convert_ldm_vae` outputs).
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION = re.compile(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def rename_old_attention(key: str) -> str:
    """'...attentions.0.query.weight' -> '...attentions.0.to_q.weight'; other keys unchanged."""
    m = _OLD_ATTENTION.fullmatch(key)
    if m is None:
        return key
    return f"{m.group(1)}.{_OLD_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"


def vae_param_shapes(vae: AutoencoderKL) -> common.Params:
    """The VAE's parameter tree as ShapeDtypeStructs (nothing allocated)."""
    size = 2 ** (len(vae.block_out_channels) - 1)
    return common.eval_shapes(vae, jnp.zeros((1, size, size, vae.in_channels), jnp.float32))


def vae_from_state_dict(state_dict: Mapping[str, Any], config: Mapping[str, Any], *,
                        source: str, dtype: jnp.dtype = jnp.float32
                        ) -> tuple[AutoencoderKL, common.Params]:
    """(module, params) from a diffusers-named VAE state dict (old attention names accepted)."""
    vae = AutoencoderKL.from_config(config, dtype=dtype)
    params, _ = common.torch_to_flax(state_dict, vae_param_shapes(vae), source=source,
                                     rename=rename_old_attention)
    return vae, common.to_device(params, dtype)


def load_vae(path: str, dtype: jnp.dtype = jnp.float32, variant: Optional[str] = None
             ) -> tuple[AutoencoderKL, common.Params]:
    """Loads a diffusers AutoencoderKL folder (config.json + weights) as (module, params).

    Every weight is checked against the module built from config.json; params are cast to
    `dtype` (the module computes in it too).
    """
    config = common.read_config(path)
    state_dict = common.load_state_dict(path, variant=variant)
    return vae_from_state_dict(state_dict, config, source=f"VAE weights in {path}", dtype=dtype)


def vae_to_diffusers(params: common.Params, config: Mapping[str, Any], out_dir: str) -> None:
    """Writes `out_dir/config.json` and `diffusion_pytorch_model.safetensors` for diffusers."""
    AutoencoderKL.from_config(config)  # refuse to export a config we could not load back
    os.makedirs(out_dir, exist_ok=True)
    full = {"_class_name": "AutoencoderKL", **{k: v for k, v in config.items() if not k.startswith("_")}}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(full, f, indent=2, sort_keys=True)
    state_dict = common.flax_to_torch(jax.device_get(params))
    common.write_safetensors(os.path.join(out_dir, "diffusion_pytorch_model.safetensors"),
                             state_dict, metadata={"format": "pt"})
