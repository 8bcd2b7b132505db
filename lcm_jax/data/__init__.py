"""Training inputs: sources addressed by (step, process), a registry of named sources, and the
on-disk latent cache. Importing the package registers 'synthetic', 'folder', 'webdataset',
'parquet' and 'array_record'."""
from lcm_jax.data.disk_cache import DiskLatentCache
from lcm_jax.data.loader import EncodedImageSource
from lcm_jax.data.sources import (ImageCaptionSource, Source, SyntheticLatents, make_source,
                                  register_source, source_names)
from lcm_jax.data import parquet, records, webdataset  # noqa: F401,E402  (register their sources)

__all__ = ["DiskLatentCache", "EncodedImageSource", "ImageCaptionSource", "Source", "SyntheticLatents",
           "make_source", "register_source", "source_names"]
