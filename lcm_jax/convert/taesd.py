"""diffusers AutoencoderTiny (TAESD) folders -> (AutoencoderTiny, Flax params), strictly checked."""
from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp

from lcm_jax.convert import common
from lcm_jax.models.taesd import AutoencoderTiny

WEIGHTS_NAME = "diffusion_pytorch_model"


def taesd_shapes(module: AutoencoderTiny) -> common.Params:
    """The encoder's and decoder's parameter tree as ShapeDtypeStructs (no weights)."""
    f = module.downsample_factor
    return common.eval_shapes(module, jnp.zeros((1, 2 * f, 2 * f, module.in_channels), module.dtype))


def load_taesd(path: str, dtype: Any = jnp.float32,
               variant: Optional[str] = None) -> tuple[AutoencoderTiny, common.Params]:
    """Loads a diffusers AutoencoderTiny folder (config.json + safetensors), e.g. madebyollin/taesd."""
    cfg = common.read_config(path)
    try:
        module = AutoencoderTiny.from_config(cfg, dtype=dtype)
    except ValueError as e:
        raise common.WeightsError(f"{path}/config.json: {e}") from e
    state = common.load_state_dict(path, WEIGHTS_NAME, variant)
    params, _ = common.torch_to_flax(state, taesd_shapes(module), source=f"AutoencoderTiny weights in {path}")
    return module, common.to_device(params, dtype)
