"""Training inputs: sources addressed by (step, process), a registry of named sources, and the
latent cache. Importing the package registers 'synthetic', 'folder', 'webdataset', 'parquet'
and 'array_record'."""
from lcm_jax.data.cache import LatentCache
from lcm_jax.data.loader import EncodedImageSource
from lcm_jax.data.sources import (ImageCaptionSource, Source, SyntheticLatents, make_source,
                                  register_source, source_names)
from lcm_jax.data import parquet, records, webdataset  # noqa: F401,E402  (register their sources)

__all__ = ["EncodedImageSource", "ImageCaptionSource", "LatentCache", "Source", "SyntheticLatents",
           "make_source", "register_source", "source_names"]
