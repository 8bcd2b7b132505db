"""Image-caption sources over indexed shards, and the prefetching loader every source shares.

`EncodedImageSource` turns a `Reader` (index -> encoded image, caption, metadata size) into
step-addressed batches:

    source.batch(step, process_index=0, process_count=1) -> {
        'pixel_values': float32 (b, R, R, 3) in [-1, 1] (NHWC),
        'input_ids': tokenize(captions),
        'original_size': int32 (b, 2) (height, width), 'crop_top_left': int32 (b, 2) (top, left)}
    source.iterate(start_step, process_index=0, process_count=1, num_workers=None, prefetch=None)
        -> batch(start_step), batch(start_step + 1), ... produced off the main thread
    source.counters() -> {'skipped_corrupt', 'skipped_no_caption', 'skipped_small',
                          'skipped_aspect'}: samples substituted so far in batches this process
                          returned (each occurrence counts)

A sample that cannot be used (undecodable image, empty caption, too small) is replaced by the
next index of the shuffled order, so a batch stays a pure function of (step, process).
"""
from __future__ import annotations

import collections
import sys
from typing import Callable, Iterator, NamedTuple, Optional, Protocol

import numpy as np

from lcm_jax.data.sources import Batch, _local_slice, needs_tokenizer
from lcm_jax.data.transforms import (SKIP_REASONS, ImageData, ImageTransform, SkipSample,
                                     transform_from_config)

MAX_SUBSTITUTIONS = 64   # consecutive unusable samples before a batch fails


class Sample(NamedTuple):
    image: Optional[ImageData]               # encoded bytes or uint8 pixels; None: unreadable
    caption: Optional[str]
    original_size: Optional[tuple[int, int]]  # (height, width) from metadata, if known


class Reader(Protocol):
    """Random access to a source's (filtered) samples. Must pickle (worker processes): open
    files lazily and leave handles out of the pickled state."""
    length: int

    def read(self, i: int) -> Sample: ...


def iterate_batches(produce: Callable[[int], tuple[Batch, dict]], start_step: int,
                    num_workers: int, prefetch: int,
                    finish: Callable[[Batch, dict], Batch]) -> Iterator[Batch]:
    """finish(*produce(start_step)), finish(*produce(start_step + 1)), ...: `produce` runs ahead
    in grain, in `num_workers` processes (mp_prefetch, each worker making whole batches, yielded
    in step order) or with num_workers=0 in one background thread of this process; `finish`
    runs in this process as each batch is yielded."""
    import grain
    from absl import flags

    ds = grain.MapDataset.range(start_step, sys.maxsize).map(produce)
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():   # grain reads its absl flags in the workers
            flags.FLAGS.mark_as_parsed()
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers,
                                         per_worker_buffer_size=max(1, prefetch)))
    else:
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, prefetch)))
    iterator = iter(it)
    try:
        for batch, counts in iterator:
            yield finish(batch, counts)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


class EncodedImageSource:
    """Shuffled, step-addressed batches of a Reader's samples; see the module docstring.

    `tokenize(captions) -> array`. `seed` fixes the shuffle and the per-example crop/flip
    randomness (seeded by (seed, step, slot of the global batch), so every process count sees
    the same examples). `filter_report` is the index-time FilterReport, if the reader has one.
    """

    def __init__(self, reader: Reader, global_batch_size: int,
                 tokenize: Callable[[list[str]], np.ndarray], transform: ImageTransform,
                 seed: int = 0, name: str = "dataset", num_workers: int = 0, prefetch: int = 2):
        import grain

        if reader.length <= 0:
            raise ValueError(f"{name} yields no samples; check the path and any filters")
        self.reader, self.global_batch_size, self.length = reader, global_batch_size, reader.length
        self._tokenize, self.transform, self.seed, self.name = tokenize, transform, seed, name
        self.num_workers, self.prefetch = num_workers, prefetch
        self.filter_report = getattr(reader, "filter_report", None)
        self._order = grain.MapDataset.range(reader.length).shuffle(seed=seed).repeat()
        self._counts = collections.Counter()

    def counters(self) -> dict[str, int]:
        """Samples substituted so far, by reason, over the batches this object returned."""
        return {f"skipped_{r}": self._counts[f"skipped_{r}"] for r in SKIP_REASONS}

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch:
        return self._finish(*self.produce(step, process_index, process_count))

    def _finish(self, batch: Batch, counts: dict) -> Batch:
        """Counts the batch's substitutions; uint8 pixels to float32 in [-1, 1] (uint8 is what
        crosses from a worker process: a quarter of the bytes)."""
        self._counts.update(counts)
        return dict(batch, pixel_values=batch["pixel_values"].astype(np.float32) / 127.5 - 1.0)

    def iterate(self, start_step: int, process_index: int = 0, process_count: int = 1,
                num_workers: Optional[int] = None, prefetch: Optional[int] = None) -> Iterator[Batch]:
        """batch(start_step), batch(start_step + 1), ... (equal element for element), decoded
        ahead in `num_workers` processes (default data.num_workers; 0: one thread here) with
        `prefetch` batches buffered per worker (default data.prefetch_batches)."""
        _local_slice(self.global_batch_size, process_index, process_count)  # fail here, not in a worker
        workers = self.num_workers if num_workers is None else num_workers
        depth = self.prefetch if prefetch is None else prefetch
        return iterate_batches(_Produce(self, process_index, process_count), start_step, workers,
                               depth, self._finish)

    def produce(self, step: int, process_index: int = 0, process_count: int = 1) -> tuple[Batch, dict]:
        """(batch `step` of this process with uint8 pixel_values, its substitution counts);
        changes nothing."""
        counts = collections.Counter()
        sl = _local_slice(self.global_batch_size, process_index, process_count)
        return self._stack([self._example(step, slot, counts) for slot in range(sl.start, sl.stop)]), dict(counts)

    def examples(self, indices) -> Batch:
        """The examples at dataset `indices`, unshuffled (an unusable one replaced by the next
        index, and counted); crop/flip seeded by (seed, index). The latent cache reads these."""
        counts = collections.Counter()
        rows = [self._first_usable(((int(i) + k) % self.length for k in range(MAX_SUBSTITUTIONS)),
                                   np.random.default_rng([self.seed, 2 ** 31, int(i)]), counts, f"index {i}")
                for i in indices]
        return self._finish(self._stack(rows), dict(counts))

    def _stack(self, examples: list) -> Batch:
        return {"pixel_values": np.stack([e.pixels for e, _ in examples]),
                "input_ids": self._tokenize([c for _, c in examples]),
                "original_size": np.array([e.original_size for e, _ in examples], np.int32),
                "crop_top_left": np.array([e.crop_top_left for e, _ in examples], np.int32)}

    def _example(self, step: int, slot: int, counts: collections.Counter):
        position = step * self.global_batch_size + slot
        candidates = (int(self._order[position + k]) for k in range(MAX_SUBSTITUTIONS))
        return self._first_usable(candidates, np.random.default_rng([self.seed, step, slot]), counts,
                                  f"position {position} of the shuffled order")

    def _first_usable(self, candidates, rng, counts: collections.Counter, where: str):
        """(transformed image, caption) of the first usable sample among `candidates`."""
        for index in candidates:
            sample = self.reader.read(index)
            try:
                if not sample.caption or not sample.caption.strip():
                    raise SkipSample("no_caption")
                if sample.image is None:
                    raise SkipSample("corrupt", "no image data")
                return self.transform(sample.image, rng, sample.original_size), sample.caption
            except SkipSample as e:
                counts[f"skipped_{e.reason}"] += 1
        raise ValueError(f"{self.name}: {MAX_SUBSTITUTIONS} consecutive samples from {where} are "
                         f"unusable ({dict(counts)}); check the data and data.min_size / "
                         "data.max_aspect_ratio")


class _Produce:
    """A picklable produce(step) for one process's share (grain workers receive it)."""

    def __init__(self, source: EncodedImageSource, process_index: int, process_count: int):
        self.source, self.process_index, self.process_count = source, process_index, process_count

    def __call__(self, step: int) -> tuple[Batch, dict]:
        return self.source.produce(int(step), self.process_index, self.process_count)


def source_from_config(cfg, reader: Reader, tokenize, kind: str) -> EncodedImageSource:
    """The EncodedImageSource of `reader` with the config's batch size, seed, transform and
    loader settings (data.num_workers, data.prefetch_batches)."""
    d = cfg.data
    return EncodedImageSource(reader, cfg.batch_size, needs_tokenizer(kind, tokenize),
                              transform_from_config(d), seed=cfg.seed, name=d.path,
                              num_workers=d.get("num_workers", 0), prefetch=d.get("prefetch_batches", 2))
