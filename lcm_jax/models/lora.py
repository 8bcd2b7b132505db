"""LoRA as a transformation of parameter trees (no module wrapping).

A LoRA adapter for a Dense kernel W (in, out) is a pair down (in, r), up (r, out); for a conv
kernel W (kh, kw, in, out) it is down (kh, kw, in, r) (a conv to r channels) and up (r, out) (a
1x1 conv). Since both factors are linear, applying the adapter next to the frozen layer equals
applying the merged kernel W + scale * down @ up, so `merge` gives the exact same function
whether it runs once ("fused") or inside every step ("unfused", what training does: gradients
flow to the factors only). scale = alpha / rank as in PEFT.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Params = Any

# The layers diffusers' LCM-LoRA recipe adapts (module paths in Flax naming).
UNET_LORA_TARGETS = (
    r"/to_q$", r"/to_k$", r"/to_v$", r"/to_out_0$", r"/proj_in$", r"/proj_out$",
    r"/ff/net_0/proj$", r"/ff/net_2$", r"/conv1$", r"/conv2$", r"/conv_shortcut$",
    r"/downsamplers_0/conv$", r"/upsamplers_0/conv$", r"/time_emb_proj$",
)


def target_paths(params: Params, targets: Sequence[str] = UNET_LORA_TARGETS) -> list[str]:
    """Module paths ('a/b/c') whose `kernel` matches one of the regexes in `targets`."""
    flat = traverse_util.flatten_dict(params)
    paths = ["/".join(p[:-1]) for p in flat if p[-1] == "kernel"]
    return sorted(p for p in paths if any(re.search(t, "/" + p) for t in targets))


def init_lora(rng: jax.Array, params: Params, rank: int,
              targets: Sequence[str] = UNET_LORA_TARGETS, dtype=jnp.float32) -> Params:
    """LoRA factors for every targeted kernel: `down` Gaussian with std 1/rank, `up` = 0 (as PEFT),
    so the adapted model starts exactly equal to the base model."""
    flat = traverse_util.flatten_dict(params)
    paths = target_paths(params, targets)
    if not paths:
        raise ValueError(f"no kernel in the model matches the LoRA targets {list(targets)}")
    shapes = []
    for path in paths:
        *lead, fan_in, fan_out = flat[tuple(path.split("/")) + ("kernel",)].shape
        shapes.append(((*lead, fan_in, rank), fan_out))
    sizes = [int(np.prod(s)) for s, _ in shapes]
    offsets = np.cumsum([0] + sizes)

    @jax.jit  # one program for every factor, instead of one eager op per kernel shape
    def draw(key):
        noise = jax.random.normal(key, (sum(sizes),), dtype) / rank
        out: dict[tuple[str, ...], jax.Array] = {}
        for path, (shape, fan_out), start, size in zip(paths, shapes, offsets, sizes):
            out[tuple(path.split("/")) + ("down",)] = noise[start:start + size].reshape(shape)
            out[tuple(path.split("/")) + ("up",)] = jnp.zeros((rank, fan_out), dtype)
        return out

    return traverse_util.unflatten_dict(draw(rng))


def adapters(lora: Params) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{'a/b/c': (down, up)} from a LoRA tree (nested like the model, leaves 'down' and 'up')."""
    flat = traverse_util.flatten_dict(lora)
    return {"/".join(k[:-1]): (flat[k[:-1] + ("down",)], v) for k, v in flat.items() if k[-1] == "up"}


def lora_delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """The kernel update of one adapter, in the layout of the kernel it adapts."""
    return jnp.einsum("...ir,ro->...io", down, up)


def merge(params: Params, lora: Params, scale: float) -> Params:
    """Base params with each adapted kernel replaced by W + scale * down @ up."""
    flat = dict(traverse_util.flatten_dict(params))
    for path, (down, up) in adapters(lora).items():
        key = tuple(path.split("/")) + ("kernel",)
        if key not in flat:
            raise KeyError(f"LoRA adapter for {path!r} has no kernel in the model")
        w = flat[key]
        flat[key] = (w + scale * lora_delta(down, up).astype(w.dtype)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def merge_adapters(params: Params, adapters: Sequence[tuple[Params, Any]]) -> Params:
    """Base params with several LoRAs added at their own weights: W + sum_i w_i down_i @ up_i
    (diffusers' set_adapters(names, adapter_weights))."""
    for lora, weight in adapters:
        params = merge(params, lora, weight)
    return params
