"""diffusers ControlNetModel folders -> (ControlNetModel, Flax params), with the UNet's strict
key and shape checks."""
from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
from flax import traverse_util

from lcm_jax.convert import common
from lcm_jax.convert.unet import WEIGHTS_NAME, _to_device_one_by_one, dummy_inputs
from lcm_jax.models.controlnet import ControlNetModel


def controlnet_shapes(module: ControlNetModel) -> common.Params:
    """The ControlNet's parameter tree as ShapeDtypeStructs (traced on tiny dummy inputs)."""
    sample, t, context, added = dummy_inputs(module.config, module.dtype)
    f = 2 ** (len(module.conditioning_embedding_out_channels) - 1)
    image = jnp.zeros((1, 8 * f, 8 * f, module.conditioning_channels), module.dtype)
    return common.eval_shapes(module, sample, t, context, image, 1.0, added)


def load_controlnet(path: str, dtype: Any = jnp.float32, variant: Optional[str] = None,
                    param_dtype: Any = None) -> tuple[ControlNetModel, common.Params]:
    """Loads a diffusers ControlNetModel folder (config.json + safetensors, sharded or a variant).

    dtype: compute dtype, also the params' dtype unless `param_dtype` is given.
    """
    cfg = common.read_config(path)
    if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise common.WeightsError(f"{path}/config.json is a {cfg['_class_name']}, not a ControlNetModel "
                                  "(pass the ControlNet's folder)")
    try:
        module = ControlNetModel.from_config(cfg, dtype=dtype)
    except ValueError as e:
        raise common.WeightsError(f"{path}/config.json: {e}") from e
    state = common.load_state_dict(path, WEIGHTS_NAME, variant)
    params, _ = common.torch_to_flax(state, controlnet_shapes(module),
                                     source=f"ControlNet weights in {path}")
    del state
    return module, _to_device_one_by_one(traverse_util.flatten_dict(params), param_dtype or dtype)
