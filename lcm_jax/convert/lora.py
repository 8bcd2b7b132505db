"""LoRA weights in diffusers/PEFT or kohya safetensors <-> lcm-jax LoRA trees.

Accepted key layouts for a UNet module `down_blocks.0.attentions.0.proj_in`:
  PEFT / diffusers:  unet.down_blocks.0.attentions.0.proj_in.lora_A.weight   (r, in[, kh, kw])
                     unet.down_blocks.0.attentions.0.proj_in.lora_B.weight   (out, r[, 1, 1])
  older diffusers:   ...proj_in.lora.down.weight / ...proj_in.lora.up.weight
  kohya (A1111):     lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight / .lora_up.weight
                     and an optional .alpha (scale alpha / r; a PEFT file's lora_alpha is in the
                     diffusers metadata 'lora_adapter_metadata', else diffusers takes alpha = r)
The per-module scale is folded into `up`, so the returned tree merges with scale 1.0.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional

import numpy as np
from flax import traverse_util
from safetensors import safe_open

from lcm_jax.convert.common import (WeightsError, flax_module_path_to_torch, read_weights_file,
                                    write_safetensors)

Params = Any
_PATTERNS = (
    (re.compile(r"^(?:unet\.)?(?:base_model\.model\.)?(.+)\.lora_A(?:\.default)?\.weight$"), "down"),
    (re.compile(r"^(?:unet\.)?(?:base_model\.model\.)?(.+)\.lora_B(?:\.default)?\.weight$"), "up"),
    (re.compile(r"^(?:unet\.)?(.+)\.lora\.down\.weight$"), "down"),
    (re.compile(r"^(?:unet\.)?(.+)\.lora\.up\.weight$"), "up"),
    (re.compile(r"^lora_unet_(.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^lora_unet_(.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^lora_unet_(.+)\.alpha$"), "alpha"),
)


def _module_index(unet_params: Params) -> dict[str, tuple[str, ...]]:
    """torch module name and kohya name -> Flax module path, for every kernel of the UNet."""
    index = {}
    for path in traverse_util.flatten_dict(unet_params):
        if path[-1] != "kernel":
            continue
        torch_name = flax_module_path_to_torch(path[:-1])
        index[torch_name] = path[:-1]
        index[torch_name.replace(".", "_")] = path[:-1]
    return index


def _flax_factor(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "down":  # (r, in) -> (in, r); conv (r, in, kh, kw) -> (kh, kw, in, r)
        return arr.T if arr.ndim == 2 else arr.transpose(2, 3, 1, 0)
    return arr.reshape(arr.shape[0], arr.shape[1]).T  # (out, r[, 1, 1]) -> (r, out)


def _peft_alpha(path: str) -> Optional[float]:
    """lora_alpha of the PEFT config diffusers stores in a LoRA file's metadata, if any (without
    it diffusers takes alpha = rank, scale 1). PEFT's scale is lora_alpha / (the module's rank)."""
    if not path.endswith(".safetensors"):
        return None
    with safe_open(path, "np") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if raw is None:
        return None
    config = {k.removeprefix("unet."): v for k, v in json.loads(raw).items()}
    unsupported = [k for k in ("use_rslora", "use_dora", "alpha_pattern") if config.get(k)]
    if unsupported:
        raise WeightsError(f"{path}: the LoRA's PEFT config sets {unsupported}, which lcm-jax does not "
                           "implement; merge it with PEFT and load the merged UNet instead")
    return float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None


def load_lora(path: str, unet_params: Params) -> tuple[Params, float]:
    """Reads LoRA weights for the UNet; returns (LoRA tree with scales folded into `up`, 1.0)."""
    sd = read_weights_file(path)
    peft_alpha = _peft_alpha(path)
    index = _module_index(unet_params)
    kernels = traverse_util.flatten_dict(unet_params)
    found: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if key.startswith(("text_encoder", "lora_te")):
            continue  # text-encoder LoRA is not applied (LCM-LoRA adapts the UNet only)
        match = next(((m, kind) for p, kind in _PATTERNS if (m := p.match(key))), None)
        if match is None:
            raise WeightsError(f"{path}: key {key!r} is not a LoRA weight of a known layout "
                               "(PEFT lora_A/lora_B, diffusers lora.down/up, kohya lora_down/up)")
        m, kind = match
        module = index.get(m.group(1))
        if module is None:
            raise WeightsError(f"{path}: LoRA key {key!r} names module {m.group(1)!r}, which this "
                               "UNet does not have (was the LoRA made for another base model?)")
        found.setdefault(module, {})[kind] = np.asarray(value, np.float32)
    if not found:
        raise WeightsError(f"{path} contains no UNet LoRA weights")
    out = {}
    for module, f in found.items():
        if "down" not in f or "up" not in f:
            raise WeightsError(f"{path}: module {'/'.join(module)} has only {sorted(f)}; both "
                               "down (A) and up (B) factors are needed")
        down, up = _flax_factor(f["down"], "down"), _flax_factor(f["up"], "up")
        rank = down.shape[-1]
        alpha = float(f["alpha"]) if "alpha" in f else peft_alpha
        scale = alpha / rank if alpha is not None else 1.0
        kshape = kernels[module + ("kernel",)].shape
        if down.shape[:-1] != kshape[:-1] or up.shape[-1] != kshape[-1]:
            raise WeightsError(f"{path}: LoRA for {'/'.join(module)} has down {down.shape}, up "
                               f"{up.shape}; the kernel is {kshape}")
        out[module + ("down",)] = down
        out[module + ("up",)] = up * scale
    return traverse_util.unflatten_dict(out), 1.0


def _torch_factors(lora: Params) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{torch module name: (down (r, in[, kh, kw]), up (out, r[, 1, 1]))}, the inverse of
    `_flax_factor`."""
    flat = traverse_util.flatten_dict(lora)
    out = {}
    for key, up in flat.items():
        if key[-1] != "up":
            continue
        down = np.asarray(flat[key[:-1] + ("down",)], np.float32)
        a = down.T if down.ndim == 2 else down.transpose(3, 2, 0, 1)
        b = np.asarray(up, np.float32).T
        out[flax_module_path_to_torch(key[:-1])] = (a, b if down.ndim == 2 else b[:, :, None, None])
    return out


def save_lora_peft(lora: Params, scale: float, path: str) -> None:
    """Writes a LoRA tree as diffusers/PEFT safetensors (`unet.<module>.lora_A/B.weight`), with
    `scale` folded into B so that diffusers' `load_lora_weights` reproduces it (alpha = rank)."""
    tensors = {}
    for name, (a, b) in _torch_factors(lora).items():
        tensors[f"unet.{name}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"unet.{name}.lora_B.weight"] = np.ascontiguousarray(b * scale)
    write_safetensors(path, tensors, metadata={"format": "pt"})


def save_lora_kohya(lora: Params, scale: float, path: str) -> None:
    """Writes a LoRA tree as kohya/A1111 safetensors (`lora_unet_<module with _>.lora_down.weight`,
    `.lora_up.weight` and `.alpha` = scale * rank, so that alpha / rank is `scale`)."""
    tensors = {}
    for name, (down, up) in _torch_factors(lora).items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = np.ascontiguousarray(down)
        tensors[f"{key}.lora_up.weight"] = np.ascontiguousarray(up)
        tensors[f"{key}.alpha"] = np.asarray(scale * down.shape[0], np.float32)
    write_safetensors(path, tensors, metadata={"format": "pt"})
