"""Training inputs: sources addressed by (step, process), a registry of named sources, and the
on-disk latent cache."""
from lcm_jax.data.disk_cache import DiskLatentCache
from lcm_jax.data.sources import (ImageCaptionSource, Source, SyntheticLatents, make_source,
                                  register_source, source_names)

__all__ = ["DiskLatentCache", "ImageCaptionSource", "Source", "SyntheticLatents", "make_source",
           "register_source", "source_names"]
