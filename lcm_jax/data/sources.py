"""Training inputs behind one small interface: a batch is a pure function of (step, process).

    source.batch(step, process_index, process_count) -> dict of numpy arrays (this process's part)

Because every batch is addressed by the step, resuming from a checkpoint at step s reads exactly
the batches an uninterrupted run would have read (the step *is* the saved iterator position),
and each process reads only its own examples. Sources:

- `SyntheticLatents`: random latents and text embeddings (tiny configs, benchmarks).
- `ImageCaptionSource`: an image folder with `metadata.jsonl` ({"file_name", "text"} per line,
  the common image-folder convention) or the procedural shapes world, read through grain with
  seeded shuffling; yields uint8 pixels (as float in [-1, 1]) and token ids.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

Batch = dict[str, np.ndarray]


class Source(Protocol):
    global_batch_size: int

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch: ...


def _local_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    if global_batch % process_count:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {process_count} "
                         "processes; each process must read an equal share")
    n = global_batch // process_count
    return slice(process_index * n, (process_index + 1) * n)


class SyntheticLatents:
    """Seeded Gaussian latents and text embeddings; uncond embeddings are fixed per source."""

    def __init__(self, global_batch_size: int, latent_shape: Sequence[int], text_shape: Sequence[int],
                 seed: int = 0):
        self.global_batch_size = global_batch_size
        self.latent_shape, self.text_shape, self.seed = tuple(latent_shape), tuple(text_shape), seed

    def uncond_embeds(self) -> np.ndarray:
        return np.random.default_rng([self.seed, 2 ** 31]).standard_normal((1, *self.text_shape)).astype(np.float32)

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        b = self.global_batch_size
        out = {"latents": rng.standard_normal((b, *self.latent_shape)).astype(np.float32),
               "prompt_embeds": rng.standard_normal((b, *self.text_shape)).astype(np.float32)}
        sl = _local_slice(b, process_index, process_count)
        return {k: v[sl] for k, v in out.items()}


def read_image_folder(folder: str) -> list[tuple[str, str]]:
    """(image path, caption) pairs from `folder/metadata.jsonl`; errors name the folder and line."""
    meta = os.path.join(folder, "metadata.jsonl")
    if not os.path.exists(meta):
        raise FileNotFoundError(f"{folder} has no metadata.jsonl: an image folder needs one line "
                                '{"file_name": "...", "text": "..."} per image')
    items = []
    with open(meta) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                items.append((os.path.join(folder, rec["file_name"]), str(rec["text"])))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{meta} line {i}: expected a JSON object with 'file_name' and "
                                 f"'text' ({e})") from e
    missing = [p for p, _ in items[:1000] if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{meta} names images that do not exist, e.g. {missing[:3]}")
    if not items:
        raise ValueError(f"{meta} lists no images: the folder yields no samples")
    return items


class ImageCaptionSource:
    """Random-access (index -> image uint8 (H,W,3), caption) examples, shuffled per epoch by seed.

    `examples(index)` is the whole per-example read; grain's MapDataset supplies the seeded global
    shuffle, so batch `step` is the same on every run and every process count.
    """

    def __init__(self, examples: Callable[[int], tuple[np.ndarray, str]], length: int,
                 global_batch_size: int, tokenize: Callable[[list[str]], np.ndarray],
                 seed: int = 0, name: str = "dataset"):
        import grain

        if length <= 0:
            raise ValueError(f"{name} yields no samples; check the path and any filters")
        self.global_batch_size, self._examples, self._tokenize = global_batch_size, examples, tokenize
        self._order = grain.MapDataset.range(length).shuffle(seed=seed).repeat()
        self.length = length

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch:
        b = self.global_batch_size
        sl = _local_slice(b, process_index, process_count)
        return self.examples([self._order[step * b + i] for i in range(sl.start, sl.stop)])

    def examples(self, indices: Sequence[int]) -> Batch:
        """The raw examples at dataset `indices` (unshuffled), as a batch."""
        images, captions = zip(*(self._examples(int(i)) for i in indices))
        pixels = np.stack(images).astype(np.float32) / 127.5 - 1.0
        return {"pixel_values": pixels, "input_ids": self._tokenize(list(captions))}


class LatentCache:
    """Latents and text embeddings of the first `size` examples, encoded once (frozen VAE and
    text encoder), then served like the source they came from: a batch is a function of the step.
    Skips the VAE encoder and text encoder in every training step.

    `reuse_key`: a string naming everything the encoding depends on (models, data, seed). The
    process keeps the last cache it built under its key, so a second run in the same process
    over the same data (the demo's LCD and LCM-LoRA runs) does not encode it again.
    """

    _last: tuple[Optional[str], Optional[Batch]] = (None, None)

    def __init__(self, source: ImageCaptionSource, encode: Callable[[Batch], Batch], size: int,
                 seed: int = 0, chunk: int = 256, log: Callable[[str], None] = print,
                 reuse_key: Optional[str] = None):
        import grain

        size = min(size, source.length)
        key = None if reuse_key is None else f"{reuse_key}|size={size}"
        if key is not None and LatentCache._last[0] == key:
            self.arrays = LatentCache._last[1]
            log(f"latent cache: reusing the {size} examples encoded earlier in this process")
        else:
            self.arrays = self._encode(source, encode, size, chunk, log)
            if key is not None:
                LatentCache._last = (key, self.arrays)
        self.global_batch_size = source.global_batch_size
        self._order = grain.MapDataset.range(size).shuffle(seed=seed).repeat()

    @staticmethod
    def _encode(source, encode, size: int, chunk: int, log) -> Batch:
        parts, t0 = [], time.time()
        starts = range(0, size, chunk)
        every = max(1, len(starts) // 10)
        for i, start in enumerate(starts):
            parts.append(encode(source.examples(range(start, min(start + chunk, size)))))
            if i % every == every - 1 or i == len(starts) - 1:
                log(f"latent cache: {min(start + chunk, size)}/{size} examples encoded "
                    f"({time.time() - t0:.0f}s)")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch:
        b = self.global_batch_size
        sl = _local_slice(b, process_index, process_count)
        idx = np.array([self._order[step * b + i] for i in range(sl.start, sl.stop)])
        return {k: v[idx] for k, v in self.arrays.items()}


def folder_examples(folder: str, resolution: int) -> tuple[Callable[[int], tuple[np.ndarray, str]], int]:
    """Reader for an image folder: center crop and resize to `resolution` (PIL, bicubic)."""
    from PIL import Image

    items = read_image_folder(folder)

    def read(i: int) -> tuple[np.ndarray, str]:
        path, text = items[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
            return np.asarray(im, np.uint8), text

    return read, len(items)


def shapes_examples(seed: int, length: int) -> tuple[Callable[[int], tuple[np.ndarray, str]], int]:
    """The procedural shapes world as an example reader (training split: indices [0, length))."""
    from lcm_jax.data.shapes import ShapesWorld

    world = ShapesWorld(seed)

    def read(i: int) -> tuple[np.ndarray, str]:
        image, caption, _ = world.sample(i)
        return image, caption

    return read, length


def make_source(cfg: Any, tokenize: Optional[Callable[[list[str]], np.ndarray]] = None,
                latent_shape: Sequence[int] = (), text_shape: Sequence[int] = ()) -> Source:
    """The source named by config.data.source: 'synthetic', 'folder' or 'shapes'."""
    kind = cfg.data.source
    if kind == "synthetic":
        return SyntheticLatents(cfg.batch_size, latent_shape, text_shape, cfg.seed)
    if tokenize is None:
        raise ValueError(f"data.source={kind!r} reads captions and needs a tokenizer: set "
                         "model.teacher to a diffusers pipeline folder")
    if kind == "folder":
        read, n = folder_examples(cfg.data.path, cfg.data.resolution)
    elif kind == "shapes":
        read, n = shapes_examples(cfg.data.world_seed, cfg.data.num_examples)
    else:
        raise ValueError(f"data.source={kind!r} unknown; choose 'synthetic', 'folder' or 'shapes'")
    return ImageCaptionSource(read, n, cfg.batch_size, tokenize, seed=cfg.seed,
                              name=cfg.data.get("path") or kind)
