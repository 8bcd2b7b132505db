"""Training inputs behind one small interface: a batch is a pure function of (step, process).

    source.batch(step, process_index, process_count) -> dict of numpy arrays (this process's part)

Because every batch is addressed by the step, resuming from a checkpoint at step s reads exactly
the batches an uninterrupted run would have read (the step *is* the saved iterator position),
and each process reads only its own examples. Sources:

- `SyntheticLatents`: random latents and text embeddings (tiny configs, benchmarks).
- `ImageCaptionSource`: random-access (image, caption) examples, e.g. an image folder with
  `metadata.jsonl` ({"file_name", "text"} per line, the common image-folder convention), read
  through grain with seeded shuffling; yields uint8 pixels (as float in [-1, 1]) and token ids.

`config.data.source` names a source in a registry (`register_source`): 'synthetic' and 'folder'
here; 'webdataset', 'parquet' and 'array_record' in their modules (shards through
loader.EncodedImageSource); a world adds its own (the shapes world registers 'shapes').
"""
from __future__ import annotations

import json
import os
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


def step_indices(order, step: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> np.ndarray:
    """This process's dataset indices of batch `step` in a shuffled, repeated grain `order`."""
    sl = _local_slice(global_batch, process_index, process_count)
    return np.array([order[step * global_batch + i] for i in range(sl.start, sl.stop)])


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
        return self.examples(step_indices(self._order, step, self.global_batch_size,
                                          process_index, process_count))

    def examples(self, indices: Sequence[int]) -> Batch:
        """The raw examples at dataset `indices` (unshuffled), as a batch."""
        images, captions = zip(*(self._examples(int(i)) for i in indices))
        pixels = np.stack(images).astype(np.float32) / 127.5 - 1.0
        return {"pixel_values": pixels, "input_ids": self._tokenize(list(captions))}


def folder_examples(folder: str, resolution: int) -> tuple[Callable[[int], tuple[np.ndarray, str]], int]:
    """Reader for an image folder: center crop and resize to `resolution` (PIL, bicubic)."""
    from PIL import Image

    items = read_image_folder(folder)

    def read(i: int) -> tuple[np.ndarray, str]:
        path, text = items[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (OSError, SyntaxError) as e:  # truncated or not an image: the run stops, naming it
            raise ValueError(f"{path}: cannot decode this image ({e}); replace it or drop its "
                             f"line from {os.path.join(folder, 'metadata.jsonl')}") from e
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
        return np.asarray(im, np.uint8), text

    return read, len(items)


SourceFactory = Callable[..., Source]
_FACTORIES: dict[str, SourceFactory] = {}


def register_source(name: str, factory: SourceFactory) -> None:
    """Makes `config.data.source = name` build `factory(config, tokenize, latent_shape,
    text_shape)`. A world registers its sources when its package is imported (its configs import
    it), so the core never imports a world."""
    _FACTORIES[name] = factory


def source_names() -> tuple[str, ...]:
    return tuple(sorted(_FACTORIES))


def make_source(cfg: Any, tokenize: Optional[Callable[[list[str]], np.ndarray]] = None,
                latent_shape: Sequence[int] = (), text_shape: Sequence[int] = ()) -> Source:
    """The source named by config.data.source (see `register_source`)."""
    kind = cfg.data.source
    if kind not in _FACTORIES:
        raise ValueError(f"data.source={kind!r} unknown; choose one of {source_names()} (a world's "
                         "source is registered by importing its package, e.g. lcm_jax.worlds.shapes)")
    return _FACTORIES[kind](cfg, tokenize, latent_shape, text_shape)


def needs_tokenizer(kind: str, tokenize) -> Callable[[list[str]], np.ndarray]:
    """`tokenize`, or an error naming the source that reads captions without one."""
    if tokenize is None:
        raise ValueError(f"data.source={kind!r} reads captions and needs a tokenizer: set "
                         "model.teacher to a diffusers pipeline folder")
    return tokenize


def _synthetic(cfg, tokenize, latent_shape, text_shape) -> Source:
    return SyntheticLatents(cfg.batch_size, latent_shape, text_shape, cfg.seed)


def _folder(cfg, tokenize, latent_shape, text_shape) -> Source:
    read, n = folder_examples(cfg.data.path, cfg.data.resolution)
    return ImageCaptionSource(read, n, cfg.batch_size, needs_tokenizer("folder", tokenize),
                              seed=cfg.seed, name=cfg.data.path)


register_source("synthetic", _synthetic)
register_source("folder", _folder)
