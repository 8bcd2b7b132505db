"""Training inputs: sources addressed by (step, process), a registry of named sources, and the
latent cache."""
from lcm_jax.data.cache import LatentCache
from lcm_jax.data.sources import (ImageCaptionSource, Source, SyntheticLatents, make_source,
                                  register_source, source_names)

__all__ = ["ImageCaptionSource", "LatentCache", "Source", "SyntheticLatents", "make_source",
           "register_source", "source_names"]
