"""lcm-jax: Latent Consistency Models (distillation and few-step sampling) in JAX/Flax.

The public names below load on first use, so importing a part of the package (the trainer, a
model) does not import the rest of it.
"""
import importlib

_PUBLIC = {
    "load_unet": "lcm_jax.convert.unet",
    "load_vae": "lcm_jax.convert.vae",
    "load_text_encoder": "lcm_jax.convert.clip",
    "load_tokenizer": "lcm_jax.convert.clip",
    "LCMPipeline": "lcm_jax.pipeline",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lcm_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
