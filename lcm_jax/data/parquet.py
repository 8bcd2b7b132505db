"""Parquet files of image bytes and captions, read with pyarrow by row group.

Two layouts: a Hugging Face `datasets` export (image column a struct {bytes, path}) and
img2dataset's parquet mode (a binary column, e.g. 'jpg'). Building the index reads only the
caption and metadata columns; an image is read from its row group, the last few row groups
staying cached per process. Random access costs a row group read per sample when row groups
are large: for a global shuffle over big data prefer small row groups or ArrayRecord
(lcm_jax.data.records).
"""
from __future__ import annotations

import collections
from typing import Any, Optional

import numpy as np
from etils import epath

from lcm_jax.data.filters import Filter, apply_filters, metadata_filters, metadata_size
from lcm_jax.data.loader import EncodedImageSource, Sample, source_from_config
from lcm_jax.data.paths import expand_pattern, require_files
from lcm_jax.data.sources import register_source

CAPTION_COLUMNS = ("text", "caption", "TEXT", "prompt")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
ROW_GROUP_CACHE = 4


def _is_image_type(t) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _pick(schema, wanted: str, candidates, ok, what: str, path) -> str:
    names = schema.names
    if wanted:
        if wanted not in names:
            raise ValueError(f"{path} has no column {wanted!r} (data.{what}); columns: {names}")
        return wanted
    for n in candidates:
        if n in names and ok(schema.field(n).type):
            return n
    found = next((n for n in names if ok(schema.field(n).type)), None)
    if found is None:
        raise ValueError(f"{path}: no {what.split('_')[0]} column among {names}; set data.{what}")
    return found


class ParquetReader:
    """Reads the kept rows of a list of parquet files; see the module docstring."""

    def __init__(self, files: list[epath.Path], filters: list[Filter], name: str,
                 image_key: str = "", caption_key: str = ""):
        import pyarrow as pa
        import pyarrow.parquet as pq

        require_files(files, name)
        rows, metas, captions, self.image_cols = [], [], [], []
        for file_id, path in enumerate(files):
            with path.open("rb") as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                image_col = _pick(schema, image_key, IMAGE_COLUMNS, _is_image_type, "image_key", path)
                text_col = _pick(schema, caption_key, CAPTION_COLUMNS,
                                 lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
                                 "caption_key", path)
                self.image_cols.append(image_col)
                meta_cols = [n for n in schema.names if n not in (image_col, text_col) and (
                    pa.types.is_integer(schema.field(n).type) or pa.types.is_floating(schema.field(n).type))]
                for rg in range(pf.num_row_groups):
                    table = pf.read_row_group(rg, columns=[text_col, *meta_cols])
                    captions += table.column(text_col).to_pylist()
                    metas += table.select(meta_cols).to_pylist()
                    rows += [(file_id, rg, r) for r in range(table.num_rows)]
        kept, self.filter_report = apply_filters(metas, filters, name)
        self.files = [str(p) for p in files]
        self.locations = np.array(rows, np.int64)[kept]           # file, row group, row
        self.captions = [captions[i] for i in kept]
        self.sizes = [metadata_size(metas[i]) for i in kept]
        self.length = len(kept)
        self._groups: collections.OrderedDict = collections.OrderedDict()

    def read(self, i: int) -> Sample:
        file_id, rg, row = (int(v) for v in self.locations[i])
        value = self._row_group(file_id, rg)[row].as_py()
        data = value.get("bytes") if isinstance(value, dict) else value
        return Sample(data, self.captions[i], self.sizes[i])

    def _row_group(self, file_id: int, rg: int):
        import pyarrow.parquet as pq

        key = (file_id, rg)
        if key not in self._groups:
            with epath.Path(self.files[file_id]).open("rb") as f:
                column = pq.ParquetFile(f).read_row_group(rg, columns=[self.image_cols[file_id]]).column(0)
            self._groups[key] = column
            if len(self._groups) > ROW_GROUP_CACHE:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_groups"} | {
            "_groups": collections.OrderedDict()}


def _parquet(cfg, tokenize, latent_shape, text_shape) -> EncodedImageSource:
    d = cfg.data
    reader = ParquetReader(expand_pattern(d.path, ".parquet"), metadata_filters(d), d.path,
                           d.get("image_key", ""), d.get("caption_key", ""))
    return source_from_config(cfg, reader, tokenize, "parquet")


register_source("parquet", _parquet)
