"""WebDataset tar shards as img2dataset writes them: `00000.tar` holding, per sample key,
`000000000.jpg` (or .png/.webp), `.txt` (caption) and `.json` (caption, width, height,
original_width, original_height, pwatermark, punsafe, aesthetic, ...).

Random access: each shard's member index (key -> member extension -> (offset, size), plus the
text of .txt and .json members) is built once with `tarfile` and cached as
`<shard>.index.json` beside the shard, or in `data.index_dir` (when the shard folder is
read-only). An image is then read by one seek. Filters apply to the json metadata when the index
is loaded, so changing them never re-reads the shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
from etils import epath

from lcm_jax.data.filters import Filter, apply_filters, metadata_filters, metadata_size
from lcm_jax.data.loader import EncodedImageSource, Sample, source_from_config
from lcm_jax.data.paths import expand_pattern
from lcm_jax.data.sources import register_source

INDEX_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json")


def index_path(shard: epath.Path, index_dir: str = "") -> epath.Path:
    """Where the member index of `shard` is cached: beside it, or in `index_dir` under a name
    unique to the shard's full path."""
    if not index_dir:
        return shard.parent / f"{shard.name}.index.json"
    digest = hashlib.sha1(str(shard).encode()).hexdigest()[:12]
    return epath.Path(index_dir) / f"{shard.stem}-{digest}.index.json"


def build_shard_index(shard: epath.Path) -> dict[str, Any]:
    """{'version', 'shard_size', 'samples': [{'key', 'members': {ext: [offset, size]},
    'txt': str?, 'json': dict?}]} of one tar shard, members in file order."""
    samples: dict[str, dict] = {}
    with shard.open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            rec = samples.setdefault(os.path.join(folder, stem), {"members": {}})
            rec["members"][ext] = [member.offset_data, member.size]
            if ext in TEXT_EXTENSIONS:
                text = tar.extractfile(member).read().decode("utf-8", "replace")
                rec[ext] = _json_or_none(text) if ext == "json" else text
    return {"version": INDEX_VERSION, "shard_size": shard.stat().length,
            "samples": [{"key": k, **v} for k, v in samples.items()]}


def _json_or_none(text: str) -> Optional[dict]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def load_shard_index(shard: epath.Path, index_dir: str = "") -> dict[str, Any]:
    """The cached member index of `shard`, built and written (atomically) when missing or stale.
    A folder that cannot be written keeps the index in memory only, with a warning."""
    if not shard.exists():
        raise FileNotFoundError(f"webdataset shard {shard} does not exist (check data.path)")
    path = index_path(shard, index_dir)
    if path.exists():
        index = json.loads(path.read_text())
        if index.get("version") == INDEX_VERSION and index.get("shard_size") == shard.stat().length:
            return index
    index = build_shard_index(shard)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(index))
        tmp.rename(path)
    except OSError as e:
        logging.warning("cannot cache the index of %s at %s (%s); set data.index_dir to a "
                        "writable folder", shard, path, e)
    return index


class WebDatasetReader:
    """Reads the kept samples of a list of tar shards; see the module docstring.

    `image_key`: member extensions to try, ';'-separated ("" = jpg;jpeg;png;webp).
    `caption_key`: a member extension holding the caption (e.g. 'txt') or a field of the .json
    member (e.g. 'caption'); "" = 'txt', else the json's 'caption'."""

    def __init__(self, shards: list[epath.Path], filters: list[Filter], name: str,
                 image_key: str = "", caption_key: str = "", index_dir: str = ""):
        exts = tuple(image_key.split(";")) if image_key else IMAGE_EXTENSIONS
        with ThreadPoolExecutor(16) as pool:
            indexes = list(pool.map(lambda s: load_shard_index(s, index_dir), shards))
        rows, metas = [], []
        for shard_id, index in enumerate(indexes):
            for rec in index["samples"]:
                image = next((rec["members"][e] for e in exts if e in rec["members"]), None)
                if image is not None:
                    meta = rec.get("json") or {}
                    rows.append((shard_id, *image, _caption(rec, caption_key), metadata_size(meta)))
                    metas.append(meta)
        if not rows:
            raise ValueError(f"{name} holds no samples with an image member ({'/'.join(exts)}); "
                             "check data.path and data.image_key")
        kept, self.filter_report = apply_filters(metas, filters, name)
        rows = [rows[i] for i in kept]
        self.shards = [str(s) for s in shards]
        self.locations = np.array([r[:3] for r in rows], np.int64)   # shard, offset, size
        self.captions = [r[3] for r in rows]
        self.sizes = [r[4] for r in rows]
        self.length = len(rows)
        self._files: dict[int, Any] = {}

    def read(self, i: int) -> Sample:
        shard, offset, size = (int(v) for v in self.locations[i])
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = epath.Path(self.shards[shard]).open("rb")
        f.seek(offset)
        return Sample(f.read(size), self.captions[i], self.sizes[i])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_files"} | {"_files": {}}


def _caption(rec: dict, caption_key: str) -> Optional[str]:
    meta = rec.get("json") or {}
    if caption_key:
        text = rec.get(caption_key) if caption_key in TEXT_EXTENSIONS else meta.get(caption_key)
    else:
        text = rec.get("txt", meta.get("caption"))
    return text if isinstance(text, str) else None


def _webdataset(cfg, tokenize, latent_shape, text_shape) -> EncodedImageSource:
    d = cfg.data
    reader = WebDatasetReader(expand_pattern(d.path, ".tar"), metadata_filters(d), d.path,
                              d.get("image_key", ""), d.get("caption_key", ""), d.get("index_dir", ""))
    return source_from_config(cfg, reader, tokenize, "webdataset")


register_source("webdataset", _webdataset)
