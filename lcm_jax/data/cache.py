"""The latent cache: a source's examples encoded once by the frozen VAE and text encoder(s), then
served like the source they came from (a batch is a function of the step). The training step
then runs only the UNets.
"""
from __future__ import annotations

import time
from typing import Callable, MutableMapping, Optional

import numpy as np

from lcm_jax.data.sources import Batch, ImageCaptionSource, step_indices


class LatentCache:
    """Latents and text embeddings of the first `size` examples of `source`.

    `store`, `key`: an optional mapping the caller owns and a string naming everything the
    encoding depends on (models, data, seed). A cache found in `store` under `key` is served
    without encoding again (the demo's LCD and LCM-LoRA runs share one), and a new one is put
    there.
    """

    def __init__(self, source: ImageCaptionSource, encode: Callable[[Batch], Batch], size: int,
                 seed: int = 0, chunk: int = 256, log: Callable[[str], None] = print,
                 store: Optional[MutableMapping[str, Batch]] = None, key: Optional[str] = None):
        import grain

        size = min(size, source.length)
        key = None if key is None else f"{key}|size={size}"
        if store is not None and key in store:
            self.arrays = store[key]
            log(f"latent cache: reusing the {size} examples encoded earlier")
        else:
            self.arrays = self._encode(source, encode, size, chunk, log)
            if store is not None and key is not None:
                store[key] = self.arrays
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
        idx = step_indices(self._order, step, self.global_batch_size, process_index, process_count)
        return {k: v[idx] for k, v in self.arrays.items()}
