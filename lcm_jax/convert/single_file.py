"""Original single-file Stable Diffusion 1.x checkpoints (CompVis / A1111 layout) -> diffusers names.

One `.safetensors` (or `.ckpt`) holds the three models under prefixes:

    model.diffusion_model.*             UNet   (openaimodel: input_blocks / middle_block / output_blocks)
    first_stage_model.*                 VAE    (encoder.down.i.block.j / mid.attn_1 / decoder.up.i ...)
    cond_stage_model.transformer.*      CLIP   (already transformers' names)

Each model's keys are renamed through a table of (LDM module prefix, diffusers module prefix)
pairs built from its diffusers config, so both directions use one table and every key must
match an entry (strict: an unknown key is an error naming it). The renamed state dicts feed the
ordinary loaders (`torch_to_flax`), or `single_file_to_diffusers` writes diffusers folders.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from lcm_jax.convert import common
from lcm_jax.convert.common import StateDict, WeightsError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
_EMA_PREFIX = "model_ema."

# Stable Diffusion 1.x component configs (as in runwayml/stable-diffusion-v1-5's folders).
SD15_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
    "initializer_range": 0.02,
}

# Leaf-module renames inside one block kind (LDM name -> diffusers name).
_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

Table = list[tuple[str, str, dict[str, str]]]  # (ldm module, diffusers module, leaf renames)


# ---------------------------------------------------------------------------------------------
# Splitting a single file into its models
# ---------------------------------------------------------------------------------------------


def split_ldm_checkpoint(checkpoint: Mapping[str, np.ndarray], use_ema: bool = False
                         ) -> dict[str, StateDict]:
    """{'unet', 'vae', 'text_encoder'} state dicts with the LDM prefixes stripped.

    use_ema: take the UNet from the `model_ema.*` copy (names flattened without dots), as the
    original repo samples with. Diffusion-schedule buffers and other prefixes are dropped.
    """
    parts: dict[str, StateDict] = {"unet": {}, "vae": {}, "text_encoder": {}}
    for key, value in checkpoint.items():
        for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", CLIP_PREFIX)):
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
    if use_ema:
        parts["unet"] = {k: _ema_value(checkpoint, k) for k in parts["unet"]}
    parts["vae"] = {k: v for k, v in parts["vae"].items() if not k.startswith("loss.")}
    parts["text_encoder"] = {k: v for k, v in parts["text_encoder"].items()
                             if not k.endswith("position_ids")}
    return parts


def _ema_value(checkpoint: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    ema_key = _EMA_PREFIX + "diffusion_model" + key.replace(".", "")
    if ema_key not in checkpoint:
        raise WeightsError(f"use_ema=True but the checkpoint has no EMA copy of {UNET_PREFIX}{key} "
                           f"(looked for {ema_key}); load with use_ema=False")
    return checkpoint[ema_key]


# ---------------------------------------------------------------------------------------------
# Name tables, built from the diffusers configs
# ---------------------------------------------------------------------------------------------


def unet_table(config: Mapping[str, Any]) -> Table:
    """The SD 1.x openaimodel <-> diffusers UNet2DConditionModel module table for `config`."""
    lpb = config.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block={lpb!r}: single-file conversion supports one int")
    down, up = config["down_block_types"], config["up_block_types"]
    table: Table = [("time_embed.0", "time_embedding.linear_1", {}),
                    ("time_embed.2", "time_embedding.linear_2", {}),
                    ("input_blocks.0.0", "conv_in", {}), ("out.0", "conv_norm_out", {}),
                    ("out.2", "conv_out", {}),
                    ("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
                    ("middle_block.1", "mid_block.attentions.0", {}),
                    ("middle_block.2", "mid_block.resnets.1", _UNET_RESNET)]
    for b, kind in enumerate(down):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            table.append((f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}", _UNET_RESNET))
            if "CrossAttn" in kind:
                table.append((f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}", {}))
        if b < len(down) - 1:
            table.append((f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op",
                          f"down_blocks.{b}.downsamplers.0.conv", {}))
    for b, kind in enumerate(up):
        attn = "CrossAttn" in kind
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            table.append((f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}", _UNET_RESNET))
            if attn:
                table.append((f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}", {}))
        if b < len(up) - 1:
            i = b * (lpb + 1) + lpb
            table.append((f"output_blocks.{i}.{2 if attn else 1}.conv",
                          f"up_blocks.{b}.upsamplers.0.conv", {}))
    return table


def vae_table(config: Mapping[str, Any]) -> Table:
    """The LDM AutoencoderKL <-> diffusers AutoencoderKL module table for `config`."""
    n, lpb = len(config["block_out_channels"]), config.get("layers_per_block", 1)
    table: Table = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_in", f"{part}.conv_in", {}),
                  (f"{part}.norm_out", f"{part}.conv_norm_out", {}),
                  (f"{part}.conv_out", f"{part}.conv_out", {}),
                  (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
                  (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET)]
    for b in range(n):
        table += [(f"encoder.down.{b}.block.{j}", f"encoder.down_blocks.{b}.resnets.{j}", _VAE_RESNET)
                  for j in range(lpb)]
        if b < n - 1:
            table.append((f"encoder.down.{b}.downsample.conv",
                          f"encoder.down_blocks.{b}.downsamplers.0.conv", {}))
        ldm_b = n - 1 - b  # the LDM decoder numbers its levels from the highest resolution
        table += [(f"decoder.up.{ldm_b}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}", _VAE_RESNET)
                  for j in range(lpb + 1)]
        if b < n - 1:
            table.append((f"decoder.up.{ldm_b}.upsample.conv",
                          f"decoder.up_blocks.{b}.upsamplers.0.conv", {}))
    return table


# ---------------------------------------------------------------------------------------------
# Renaming through a table
# ---------------------------------------------------------------------------------------------


def _rename(state_dict: Mapping[str, np.ndarray], table: Table, to_diffusers: bool,
            what: str) -> StateDict:
    src_col, dst_col = (0, 1) if to_diffusers else (1, 0)
    by_prefix = {row[src_col]: row for row in table}
    out: StateDict = {}
    unknown = []
    for key, value in state_dict.items():
        module, leaf = key.rsplit(".", 1)
        row, rest = _find_prefix(module, by_prefix)
        if row is None:
            unknown.append(key)
            continue
        leaves = row[2] if to_diffusers else {v: k for k, v in row[2].items()}
        rest = leaves.get(rest, rest)
        new = ".".join(p for p in (row[dst_col], rest, leaf) if p)
        is_vae_attention = row[2] is _VAE_ATTENTION  # the only rows whose layout differs
        out[new] = _attention_layout(value, leaf, is_vae_attention, to_diffusers)
    if unknown:
        raise WeightsError(f"{len(unknown)} {what} keys have no diffusers counterpart for this "
                           f"config: {sorted(unknown)[:8]}; check the config matches the checkpoint")
    return out


def _find_prefix(module: str, by_prefix: Mapping[str, tuple]) -> tuple[Optional[tuple], str]:
    """The longest table prefix of `module` and the remainder ('' when it is the whole)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        row = by_prefix.get(".".join(parts[:n]))
        if row is not None:
            return row, ".".join(parts[n:])
    return None, ""


def _attention_layout(value: np.ndarray, leaf: str, vae_attention: bool, to_diffusers: bool):
    """LDM's VAE attention uses 1x1 convs (O, I, 1, 1); diffusers uses linears (O, I)."""
    if not (vae_attention and leaf == "weight"):
        return value
    if to_diffusers and value.ndim == 4:
        return value[:, :, 0, 0]
    if not to_diffusers and value.ndim == 2:
        return value[:, :, None, None]
    return value


def ldm_to_diffusers_unet(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> StateDict:
    """openaimodel UNet keys (prefix stripped) -> diffusers UNet2DConditionModel keys."""
    return _rename(state_dict, unet_table(config), True, "UNet")


def diffusers_to_ldm_unet(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> StateDict:
    """Inverse of `ldm_to_diffusers_unet`."""
    return _rename(state_dict, unet_table(config), False, "UNet")


def ldm_to_diffusers_vae(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> StateDict:
    """LDM AutoencoderKL keys (prefix stripped) -> diffusers AutoencoderKL keys and layouts."""
    return _rename(state_dict, vae_table(config), True, "VAE")


def diffusers_to_ldm_vae(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> StateDict:
    """Inverse of `ldm_to_diffusers_vae` (attention weights back to 1x1-conv shape)."""
    return _rename(state_dict, vae_table(config), False, "VAE")


def ldm_to_diffusers_clip(state_dict: Mapping[str, np.ndarray]) -> StateDict:
    """SD 1.x's CLIP keys (prefix stripped) already are transformers' CLIPTextModel names."""
    return {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}


# ---------------------------------------------------------------------------------------------
# Whole files
# ---------------------------------------------------------------------------------------------


def convert_single_file(path: str, unet_config: Mapping[str, Any] = SD15_UNET_CONFIG,
                        vae_config: Mapping[str, Any] = SD15_VAE_CONFIG, use_ema: bool = False,
                        ) -> dict[str, StateDict]:
    """Reads an SD 1.x single-file checkpoint -> diffusers-named {'unet','vae','text_encoder'}."""
    parts = split_ldm_checkpoint(common.read_weights_file(path), use_ema=use_ema)
    empty = [name for name, sd in parts.items() if not sd]
    if empty:
        raise WeightsError(f"{path} is not a Stable Diffusion 1.x single-file checkpoint: no "
                           f"{empty} weights under {UNET_PREFIX!r}, {VAE_PREFIX!r}, {CLIP_PREFIX!r}")
    converters: dict[str, Callable[[StateDict], StateDict]] = {
        "unet": lambda sd: ldm_to_diffusers_unet(sd, unet_config),
        "vae": lambda sd: ldm_to_diffusers_vae(sd, vae_config),
        "text_encoder": ldm_to_diffusers_clip,
    }
    try:
        return {name: converters[name](sd) for name, sd in parts.items()}
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from e


def load_single_file(path: str, unet_config: Mapping[str, Any] = SD15_UNET_CONFIG,
                     vae_config: Mapping[str, Any] = SD15_VAE_CONFIG,
                     text_config: Mapping[str, Any] = SD15_TEXT_CONFIG,
                     dtype: jnp.dtype = jnp.float32, use_ema: bool = False) -> dict[str, Any]:
    """{'unet', 'vae', 'text_encoder'} -> (module, params) each, from one SD 1.x checkpoint file."""
    from lcm_jax.convert.vae import vae_from_state_dict

    parts = convert_single_file(path, unet_config, vae_config, use_ema=use_ema)
    return {"unet": _load_unet(parts["unet"], unet_config, path, dtype),
            "vae": vae_from_state_dict(parts["vae"], vae_config, source=f"VAE of {path}", dtype=dtype),
            "text_encoder": _load_text_encoder(parts["text_encoder"], text_config, path, dtype)}


def _load_unet(state_dict: StateDict, config: Mapping[str, Any], path: str, dtype) -> tuple:
    from lcm_jax.convert.unet import unet_shapes  # imported here: the UNet is optional for renaming
    from lcm_jax.models.unet import UNet2DConditionModel

    module = UNet2DConditionModel.from_config(dict(config), dtype=dtype)
    params, _ = common.torch_to_flax(state_dict, unet_shapes(module), source=f"UNet of {path}")
    return module, common.to_device(params, dtype)


def _load_text_encoder(state_dict: StateDict, config: Mapping[str, Any], path: str, dtype) -> tuple:
    from lcm_jax.models.clip import CLIPTextModel

    module = CLIPTextModel.from_config(dict(config), dtype=dtype)
    ids = jnp.zeros((1, config["max_position_embeddings"]), jnp.int32)
    params, _ = common.torch_to_flax(state_dict, common.eval_shapes(module, ids),
                                     source=f"text encoder of {path}")
    return module, common.to_device(params, dtype)


def single_file_to_diffusers(path: str, out_dir: str,
                             unet_config: Mapping[str, Any] = SD15_UNET_CONFIG,
                             vae_config: Mapping[str, Any] = SD15_VAE_CONFIG,
                             text_config: Mapping[str, Any] = SD15_TEXT_CONFIG,
                             use_ema: bool = False) -> None:
    """Writes out_dir/{unet,vae,text_encoder}/ (config.json + safetensors) for the folder loaders."""
    parts = convert_single_file(path, unet_config, vae_config, use_ema=use_ema)
    layout = {"unet": (unet_config, "diffusion_pytorch_model"),
              "vae": (vae_config, "diffusion_pytorch_model"), "text_encoder": (text_config, "model")}
    for name, (config, weights_name) in layout.items():
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(dict(config), f, indent=2)
        arrays = {k: np.ascontiguousarray(v) for k, v in parts[name].items()}
        common.write_safetensors(os.path.join(folder, f"{weights_name}.safetensors"), arrays,
                                 metadata={"format": "pt"})
