"""Small image-caption datasets written in every layout the sources read: webdataset tar shards
(img2dataset layout), parquet (Hugging Face export and img2dataset), ArrayRecord. The data root
is an argument, so the same fixtures can be written to any epath folder (local or gs://)."""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from etils import epath
from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
TOKEN_LEN = 48


@dataclass
class Item:
    data: bytes
    ext: str
    caption: Optional[str]
    meta: dict = field(default_factory=dict)


def make_items(n: int = 12, bad: bool = True, seed: int = 0) -> list[Item]:
    """`n` images of assorted sizes and formats; with `bad`, item 3 is a truncated JPEG, item 5
    has no caption and item 7's json lacks 'aesthetic'."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
        fmt = FORMATS[i % 3]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(buf, fmt)
        meta = {"width": w, "height": h, "original_width": 2 * w, "original_height": 2 * h,
                "aesthetic": 4.0 + 0.5 * i, "punsafe": 0.1 * (i % 4), "pwatermark": 0.2}
        items.append(Item(buf.getvalue(), EXTENSIONS[fmt], f"caption {i}: a thing " + "x" * i, meta))
    if bad:
        items[3].data, items[3].ext = items[0].data[: len(items[0].data) // 2], "jpg"
        items[5].caption = None
        del items[7].meta["aesthetic"]
    return items


def tokenize(captions: list[str]) -> np.ndarray:
    """Captions as fixed-length utf-8 bytes: exact and reversible (see `detokenize`)."""
    out = np.zeros((len(captions), TOKEN_LEN), np.uint8)
    for i, c in enumerate(captions):
        b = c.encode()[:TOKEN_LEN]
        out[i, :len(b)] = np.frombuffer(b, np.uint8)
    return out


def detokenize(ids: np.ndarray) -> list[str]:
    return [bytes(row[row > 0]).decode() for row in np.asarray(ids, np.uint8)]


def write_webdataset(root: epath.Path, items: list[Item], per_shard: int = 4) -> list[epath.Path]:
    """img2dataset's layout: shards 00000.tar, ... of 000000000.jpg/.txt/.json members."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(items), per_shard)):
        path = root / f"{s:05d}.tar"
        with path.open("wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            for i in range(start, min(start + per_shard, len(items))):
                it, key = items[i], f"{i:09d}"
                meta = dict(it.meta, key=key, status="success")
                if it.caption is not None:
                    meta["caption"] = it.caption
                members = [(it.ext, it.data), ("json", json.dumps(meta).encode())]
                if it.caption is not None:
                    members.insert(1, ("txt", it.caption.encode()))
                for ext, data in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def write_parquet(root: epath.Path, items: list[Item], layout: str = "hf", per_file: int = 6,
                  row_group_size: int = 4) -> list[epath.Path]:
    """layout 'hf': image struct {bytes, path} + 'text' (a `datasets` export, no size columns);
    'img2dataset': binary 'jpg' + 'caption' + the metadata columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    files = []
    for k, start in enumerate(range(0, len(items), per_file)):
        part = items[start:start + per_file]
        if layout == "hf":
            table = pa.table({"image": [{"bytes": it.data, "path": f"{start + j}.{it.ext}"}
                                        for j, it in enumerate(part)],
                              "text": [it.caption for it in part]})
        else:
            cols = {"jpg": pa.array([it.data for it in part], pa.binary()),
                    "caption": [it.caption for it in part]}
            for key in ("width", "height", "original_width", "original_height", "aesthetic", "punsafe"):
                cols[key] = pa.array([it.meta.get(key) for it in part], pa.float64())
            table = pa.table(cols)
        path = root / f"part-{k:05d}.parquet"
        with path.open("wb") as f:
            pq.write_table(table, f, row_group_size=row_group_size)
        files.append(path)
    return files


def write_array_records(root: epath.Path, items: list[Item], per_shard: int = 5) -> list[epath.Path]:
    """ArrayRecord shards in lcm_jax.data.records' format; item 1 stored as raw pixels."""
    from lcm_jax.data import records

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, len(items), per_shard)):
        recs = []
        for i in range(start, min(start + per_shard, len(items))):
            it = items[i]
            image = np.asarray(Image.open(io.BytesIO(it.data)).convert("RGB")) if i == 1 else it.data
            recs.append(records.encode_record(image, it.caption, it.meta))
        path = root / f"data-{s:05d}.array_record"
        records.write_records(str(path), recs)
        paths.append(path)
    return paths


def reference_pixels(data: bytes, resolution: int, flip: bool = False,
                     top_left: Optional[tuple[int, int]] = None) -> np.ndarray:
    """PIL on the same bytes: shorter side to `resolution` (bicubic), optional flip, crop at
    `top_left` (default the centre)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    s = resolution / min(im.size)
    w, h = max(resolution, round(im.width * s)), max(resolution, round(im.height * s))
    im = im.resize((w, h), Image.BICUBIC)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    top, left = top_left if top_left is not None else ((h - resolution) // 2, (w - resolution) // 2)
    return np.asarray(im.crop((left, top, left + resolution, top + resolution)), np.uint8)
