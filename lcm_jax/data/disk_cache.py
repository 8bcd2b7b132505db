"""The latent cache on disk: a dataset encoded once by the frozen VAE and text encoder(s), stored as
ArrayRecord shards with a manifest, and read back as a source (batch = f(step, process)) with flat
memory: each batch reads only its own records.

    DIR/manifest.json                    what the cache was made from (see `manifest_for`)
    DIR/shard-00000-of-00040.array_record  `chunk` examples each, in dataset order

A record is msgpack {"index": i, "arrays": {name: [dtype, shape, bytes]}} with one example's
arrays (names flattened with '/', e.g. 'added_cond/time_ids'). Shards are written to a temporary
name and renamed when complete, so an interrupted job leaves only whole shards and resumes at the
first missing one (`lcm_jax.training.latent_cache.build`).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import msgpack
import numpy as np

from lcm_jax import fs
from lcm_jax.data.sources import Batch, step_indices

FORMAT = 1
MANIFEST = "manifest.json"
# data.* fields that change what the cache holds (the rest, like cache_dir, only where it is).
DATA_KEYS_IGNORED = ("cache_dir", "cache_size", "num_workers", "prefetch_batches", "caption_dropout")


INFORMATIVE = ("components", "data")  # recorded for people; the fingerprints are compared


class CacheMismatchError(ValueError):
    """A cache made from other models or data than the config asks for."""


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.array_record"


def _folder_fingerprint(folder: str, parts: tuple[str, ...]) -> str:
    """sha256 over each part's config.json and its weight files' names and sizes (not the bytes
    of multi-GB weights): a different model, or re-saved weights of another size, differ."""
    h = hashlib.sha256()
    for part in parts:
        d = os.path.join(folder, part)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            h.update(name.encode())
            if name.endswith(".json"):
                with open(path, "rb") as f:
                    h.update(f.read())
            else:
                h.update(str(os.path.getsize(path)).encode())
    return h.hexdigest()[:16]


def manifest_for(config, num_examples: int, chunk: int) -> dict[str, Any]:
    """Everything a cache's contents depend on, from a training config: the VAE and text encoders
    (folder and fingerprint), resolution and shapes, dtype, the posterior draw, the data."""
    folder = config.model.teacher or config.model.components
    local = fs.local_copy(folder) if folder else ""   # a gs:// teacher: its per-host copy
    data = {k: v for k, v in config.data.to_dict().items() if k not in DATA_KEYS_IGNORED}
    return {
        "format": FORMAT,
        "components": os.path.abspath(folder) if folder else "",
        "components_fingerprint": _folder_fingerprint(
            local, ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")) if folder else "",
        "resolution": int(config.data.resolution),
        "latent_size": int(config.data.latent_size),
        "text_len": int(config.data.text_len),
        "dtype": "float32",
        "posterior": "sample",          # one VAE posterior draw per example, key fold_in(seed, chunk)
        "seed": int(config.seed),
        "data_fingerprint": hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "data": json.loads(json.dumps(data, default=str)),
        "num_examples": int(num_examples),
        "chunk": int(chunk),
    }


def read_manifest(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a latent cache: it has no {MANIFEST}; make one with "
                                "`lcm-jax cache --config CONFIG --out DIR`")
    with open(path) as f:
        return json.load(f)


def check_manifest(folder: str, expected: dict[str, Any]) -> None:
    """Refuses a cache whose manifest differs from `expected`, naming every field that differs."""
    found = read_manifest(folder)
    diff = [(k, found.get(k), expected[k]) for k in expected
            if k not in INFORMATIVE and k != "data_fingerprint" and found.get(k) != expected[k]]
    if found.get("data_fingerprint") != expected["data_fingerprint"]:
        old, new = found.get("data", {}), expected["data"]
        diff += [(f"data.{k}", old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)] or [("data", old, new)]
    if diff:
        parts = ", ".join(f"{k}: cache has {a!r}, config needs {b!r}" for k, a, b in diff)
        raise CacheMismatchError(f"latent cache {folder} does not match the config ({parts}); "
                                 "re-run `lcm-jax cache` into another folder or fix the config")


def encode_record(index: int, arrays: dict[str, np.ndarray]) -> bytes:
    return msgpack.packb({"index": index, "arrays": {
        k: [str(v.dtype), list(v.shape), np.ascontiguousarray(v).tobytes()] for k, v in arrays.items()}})


def decode_record(data: bytes) -> tuple[int, dict[str, np.ndarray]]:
    rec = msgpack.unpackb(data)
    return rec["index"], {k: np.frombuffer(b, dtype).reshape(shape) for k, (dtype, shape, b) in rec["arrays"].items()}


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        *parents, leaf = k.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def write_shard(folder: str, i: int, n: int, start: int, arrays: dict[str, np.ndarray]) -> str:
    """Shard i of n holding examples start, start+1, ...; written under a temporary name, then
    renamed, so it exists only when complete."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = os.path.join(folder, shard_name(i, n))
    tmp = f"{path}.{os.getpid()}.tmp"  # processes writing the same folder never share a tmp file
    writer = ArrayRecordWriter(tmp, "group_size:1")
    count = len(next(iter(arrays.values())))
    for j in range(count):
        writer.write(encode_record(start + j, {k: v[j] for k, v in arrays.items()}))
    writer.close()
    os.replace(tmp, path)
    return path


class DiskLatentCache:
    """A finished on-disk cache served like the source it was made from."""

    def __init__(self, folder: str, global_batch_size: int, seed: int = 0,
                 expected: Optional[dict[str, Any]] = None):
        import grain

        manifest = read_manifest(folder)
        if expected is not None:
            check_manifest(folder, expected)
        n = -(-manifest["num_examples"] // manifest["chunk"])
        paths = [os.path.join(folder, shard_name(i, n)) for i in range(n)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"latent cache {folder} is incomplete ({len(missing)} of {n} shards "
                                    f"missing, e.g. {os.path.basename(missing[0])}); re-run "
                                    "`lcm-jax cache` with the same --out to finish it")
        self.records = grain.sources.ArrayRecordDataSource(paths)
        self.length, self.global_batch_size = manifest["num_examples"], global_batch_size
        self._order = grain.MapDataset.range(self.length).shuffle(seed=seed).repeat()

    def examples(self, indices) -> Batch:
        rows = [decode_record(self.records[int(i)])[1] for i in indices]
        return unflatten({k: np.stack([r[k] for r in rows]) for k in rows[0]})

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch:
        return self.examples(step_indices(self._order, step, self.global_batch_size, process_index,
                                          process_count))
