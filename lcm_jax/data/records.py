"""ArrayRecord shards of image-caption examples: the record format, a writer, and the source.

Record format (one msgpack map per record, written with group_size:1 for random access):

    {"image": bytes}                         encoded JPEG/PNG/WEBP, or
    {"pixels": bytes, "shape": [h, w, c]}    raw uint8 pixels, row-major (HWC)
    + "caption": str                         (may be absent: the sample is skipped and counted)
    + "meta": {str: number}                  optional metadata (aesthetic, punsafe, width, ...)
    + any further keys (a latent cache adds its arrays the same way as "pixels")

Shards are read with grain.sources.ArrayRecordDataSource. The ArrayRecord library opens paths
itself (local or mounted files); the pattern is expanded through etils.epath. Metadata filters
read every record once when the source is built; leave them empty for pre-filtered shards.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import numpy as np
from etils import epath

from lcm_jax.data.filters import Filter, apply_filters, metadata_filters, metadata_size
from lcm_jax.data.loader import EncodedImageSource, Sample, source_from_config
from lcm_jax.data.paths import expand_pattern, require_files
from lcm_jax.data.sources import register_source


def encode_record(image: bytes | np.ndarray, caption: Optional[str] = None,
                  meta: Optional[Mapping[str, Any]] = None, **extra: Any) -> bytes:
    """One record of the format above; `image` is encoded bytes or a uint8 (h, w, c) array."""
    import msgpack

    rec: dict[str, Any] = dict(extra)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"pixels must be uint8 (h, w, c), got {image.dtype} {image.shape}")
        rec.update(pixels=np.ascontiguousarray(image).tobytes(), shape=list(image.shape))
    else:
        rec["image"] = bytes(image)
    if caption is not None:
        rec["caption"] = caption
    if meta:
        rec["meta"] = dict(meta)
    return msgpack.packb(rec, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """A record as a dict; 'pixels' (when present) as a uint8 array of its shape."""
    import msgpack

    rec = msgpack.unpackb(data, raw=False)
    if "pixels" in rec:
        rec["pixels"] = np.frombuffer(rec["pixels"], np.uint8).reshape(rec.pop("shape"))
    return rec


def write_records(path: str, records: Iterable[bytes]) -> int:
    """Writes encoded records to one ArrayRecord shard at `path`; returns how many."""
    from array_record.python.array_record_module import ArrayRecordWriter

    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer, n = ArrayRecordWriter(str(path), "group_size:1"), 0
    try:
        for rec in records:
            writer.write(rec)
            n += 1
    finally:
        writer.close()
    return n


class ArrayRecordReader:
    """Reads the kept records of ArrayRecord shards; see the module docstring."""

    def __init__(self, files: list[epath.Path], filters: list[Filter], name: str):
        import grain

        require_files(files, name)
        self.files = [str(p) for p in files]
        self._source = None
        n = len(grain.sources.ArrayRecordDataSource(self.files))
        if not n:
            raise ValueError(f"{name} holds no records; check data.path")
        metas = [decode_record(r).get("meta") or {} for r in self._records(range(n))] if filters else [{}] * n
        kept, self.filter_report = apply_filters(metas, filters, name)
        self.indices = np.asarray(kept, np.int64)
        self.length = len(self.indices)

    def _records(self, indices) -> list[bytes]:
        import grain

        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.files)
        return self._source.__getitems__([int(i) for i in indices])

    def read(self, i: int) -> Sample:
        rec = decode_record(self._records([int(self.indices[i])])[0])
        image = rec.get("image", rec.get("pixels"))
        return Sample(image, rec.get("caption"), metadata_size(rec.get("meta") or {}))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}


def _array_record(cfg, tokenize, latent_shape, text_shape) -> EncodedImageSource:
    d = cfg.data
    reader = ArrayRecordReader(expand_pattern(d.path, ".array_record"), metadata_filters(d), d.path)
    return source_from_config(cfg, reader, tokenize, "array_record")


register_source("array_record", _array_record)
