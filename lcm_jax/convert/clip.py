"""Loading transformers CLIP text-encoder and tokenizer folders (SD 1.x / 2.x / SDXL layouts)."""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from lcm_jax.convert.common import (WeightsError, eval_shapes, load_state_dict, read_config,
                                    to_device, torch_to_flax)
from lcm_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection

_ARCHITECTURES = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}
# CLIP's context length, used when a tokenizer folder does not set model_max_length.
_CLIP_CONTEXT = 77


def _module_class(cfg: dict, folder: str):
    archs = cfg.get("architectures") or []
    found = [a for a in archs if a in _ARCHITECTURES]
    if not found:
        raise WeightsError(f"{os.path.join(folder, 'config.json')}: architectures {archs} name no "
                           f"supported text encoder; expected one of {sorted(_ARCHITECTURES)}")
    return _ARCHITECTURES[found[0]]


def _transformers_name(key: str) -> str:
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix that transformers 4
    # (and every Stable Diffusion checkpoint) uses; both map onto the same Flax tree.
    return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"


def load_text_encoder(path: str, dtype: jnp.dtype = jnp.float32, variant: Optional[str] = None):
    """Loads a transformers CLIP text-encoder folder -> (module, params), strictly.

    `config.json`'s `architectures` chooses CLIPTextModel or CLIPTextModelWithProjection; weights
    come from `model[.variant].safetensors` (single or sharded) or `.bin`. `dtype` is both the
    compute dtype of the module and the dtype of the returned params.
    """
    cfg = read_config(path)
    module = _module_class(cfg, path).from_config(cfg, dtype=dtype)
    state_dict = load_state_dict(path, weights_name="model", variant=variant)
    dummy_ids = jnp.zeros((1, module.config.max_position_embeddings), jnp.int32)
    params, _ = torch_to_flax(state_dict, eval_shapes(module, dummy_ids),
                              source=f"text encoder {path}", ignore=[r"position_ids$"],
                              rename=_transformers_name)
    return module, to_device(params, dtype)


def load_tokenizer(path: str):
    """transformers' CLIPTokenizer from a tokenizer folder (vocab.json + merges.txt, or
    tokenizer.json), with an error that says what is missing."""
    files = set(os.listdir(path)) if os.path.isdir(path) else set()
    if not ({"vocab.json", "merges.txt"} <= files or "tokenizer.json" in files):
        hint = (f"; {path} looks like a pipeline folder, pass {os.path.join(path, 'tokenizer')}"
                if "tokenizer" in files else "")
        raise WeightsError(f"{path} is not a CLIP tokenizer folder: it needs vocab.json and "
                           f"merges.txt (or tokenizer.json); found {sorted(files)}{hint}")
    from transformers import CLIPTokenizer  # only the tokenizer needs transformers
    return CLIPTokenizer.from_pretrained(path)


def encode_prompt_ids(tokenizer: Any, prompts: Union[str, Sequence[str]],
                      max_length: Optional[int] = None) -> tuple[np.ndarray, list[str]]:
    """Token ids (B, max_length) int32, padded and truncated, and the prompts that were cut.

    max_length defaults to the tokenizer's model_max_length (77 for CLIP; 77 when unset).
    The caller decides how to tell the user about the truncated prompts.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if max_length is None:
        max_length = tokenizer.model_max_length
        max_length = _CLIP_CONTEXT if max_length > 100_000 else max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np").input_ids
    # One token more than allowed tells whether a prompt was cut, without encoding it all.
    longer = tokenizer(prompts, max_length=max_length + 1, truncation=True).input_ids
    truncated = [p for p, t in zip(prompts, longer) if len(t) > max_length]
    return ids.astype(np.int32), truncated
