"""diffusers UNet folders <-> (UNet2DConditionModel, Flax params).

A student for consistency distillation is loaded from its teacher's folder with
`time_cond_proj_dim`: every teacher weight loads and the new guidance-scale projection
`time_embedding/cond_proj` starts at zero, so the student begins as exactly the teacher.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Optional, Union

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcm_jax.convert import common
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig

_COND_PROJ = "time_embedding/cond_proj/kernel"
WEIGHTS_NAME = "diffusion_pytorch_model"


def unet_shapes(module: UNet2DConditionModel) -> common.Params:
    """The UNet's parameter tree as ShapeDtypeStructs (traced on tiny dummy inputs, no weights)."""
    return _shapes(module.config, jnp.dtype(module.dtype).name)


@functools.lru_cache(maxsize=16)
def _shapes(cfg: UNetConfig, dtype: str) -> common.Params:
    module = UNet2DConditionModel(cfg, dtype=jnp.dtype(dtype))
    sample, t, context, added = dummy_inputs(cfg, module.dtype)
    cond = None if cfg.time_cond_proj_dim is None else jnp.zeros((1, cfg.time_cond_proj_dim))
    return common.eval_shapes(module, sample, t, context, cond, added)


def dummy_inputs(cfg: UNetConfig, dtype: Any) -> tuple:
    """(sample, timesteps, context, added_cond_kwargs or None): the smallest inputs that trace a
    model of this config (8x8 latents, one context token)."""
    sample = jnp.zeros((1, 8, 8, cfg.in_channels), dtype)
    context = jnp.zeros((1, 1, cfg.cross_attention_dim[0]), dtype)
    added = None
    if cfg.addition_embed_type == "text_time":
        raw = cfg.to_diffusers()
        text_dim = raw["projection_class_embeddings_input_dim"] - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": jnp.zeros((1, text_dim)), "time_ids": jnp.zeros((1, 6))}
    return sample, jnp.zeros((1,)), context, added


def load_unet(path: str, dtype: Any = jnp.float32, variant: Optional[str] = None,
              time_cond_proj_dim: Optional[int] = None, param_dtype: Any = None,
              ) -> tuple[UNet2DConditionModel, common.Params]:
    """Loads a diffusers 'unet' folder (config.json + safetensors, sharded or fp16 variant).

    dtype: compute dtype, also the params' dtype unless `param_dtype` is given.
    time_cond_proj_dim: make a w-conditioned UNet (LCM student); when the checkpoint has no
    `time_embedding.cond_proj` it is created zero-initialised.
    """
    cfg = common.read_config(path)
    cfg = _with_cond_proj(cfg, time_cond_proj_dim, path)
    module = UNet2DConditionModel.from_config(cfg, dtype=dtype)
    shapes = unet_shapes(module)
    state = common.load_state_dict(path, WEIGHTS_NAME, variant)
    missing_ok = [f"^{_COND_PROJ}$"] if time_cond_proj_dim is not None else []
    params, absent = common.torch_to_flax(state, shapes, source=f"UNet weights in {path}",
                                          missing_ok=missing_ok)
    del state  # the file's bytes: free them before the device copy (SD-size UNets are GBs)
    flat = traverse_util.flatten_dict(params)
    del params
    if absent:  # only cond_proj can be absent: the student's new w-embedding starts as a no-op
        target = traverse_util.flatten_dict(shapes)[tuple(_COND_PROJ.split("/"))]
        flat[tuple(_COND_PROJ.split("/"))] = np.zeros(target.shape, target.dtype)
    return module, _to_device_one_by_one(flat, param_dtype or dtype)


def _to_device_one_by_one(flat: dict, dtype: Any) -> common.Params:
    """numpy leaves -> jax arrays, dropping each host copy as it goes (peak memory: one model)."""
    out = {}
    for key in list(flat):
        out[key] = jnp.asarray(flat.pop(key), dtype=dtype)
    return traverse_util.unflatten_dict(out)


def _with_cond_proj(cfg: dict, time_cond_proj_dim: Optional[int], path: str) -> dict:
    if time_cond_proj_dim is None:
        return cfg
    have = cfg.get("time_cond_proj_dim")
    if have is not None and have != time_cond_proj_dim:
        raise common.WeightsError(f"{path}/config.json has time_cond_proj_dim={have} but "
                                  f"time_cond_proj_dim={time_cond_proj_dim} was asked for; pass "
                                  f"{have} or None")
    return {**cfg, "time_cond_proj_dim": time_cond_proj_dim}


def unet_to_diffusers(params: common.Params, config: Union[Mapping[str, Any], UNetConfig],
                      out_dir: str) -> None:
    """Writes a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors).

    `config` is the diffusers config dict (or the module's UNetConfig); the folder loads with
    diffusers' `UNet2DConditionModel.from_pretrained(out_dir)`.
    """
    cfg = config.to_diffusers() if isinstance(config, UNetConfig) else dict(config)
    UNetConfig.from_diffusers(cfg)  # refuse to write a config we could not have built
    cfg.setdefault("_class_name", "UNet2DConditionModel")
    os.makedirs(out_dir, exist_ok=True)
    common.write_safetensors(os.path.join(out_dir, f"{WEIGHTS_NAME}.safetensors"),
                             common.flax_to_torch(params), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
