"""lcm-jax: Latent Consistency Models (distillation and few-step sampling) in JAX/Flax."""
from lcm_jax.convert.clip import load_text_encoder, load_tokenizer
from lcm_jax.convert.unet import load_unet
from lcm_jax.convert.vae import load_vae
from lcm_jax.pipeline import LCMPipeline

__all__ = ["load_unet", "load_vae", "load_text_encoder", "load_tokenizer", "LCMPipeline"]
__version__ = "0.1.0"
