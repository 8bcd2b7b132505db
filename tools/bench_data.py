"""Input throughput: images/s of decode + resize + crop at 512 px through `source.iterate`, from
webdataset tar shards and from parquet, with 0, 1 and 2 worker processes; and beside them a
small LCD train step's examples/s fed from tar shards against the same step fed one batch over
and over (does the step wait for input?).

    python tools/bench_data.py --images 256 --steps 32 --batch 16

Writes its own fixtures in a temporary folder (JPEGs of 640x480, img2dataset tar layout and
img2dataset parquet), then prints one row per (source, workers). Rates are measured after the
first batch arrives (steady state; worker start-up excluded).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

from tests import data_fixtures as fx  # noqa: E402  (the dataset writers the tests use)


def _jpeg_items(n: int, height: int = 480, width: int = 640) -> list:
    """`n` photo-like JPEGs (smooth gradients plus noise), quality 90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    items = []
    for i in range(n):
        base = np.stack([(xx * (i + 1) / width) % 1, yy / height, (xx + yy) / (height + width)], -1)
        pixels = np.clip(base * 255 + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        items.append(fx.Item(buf.getvalue(), "jpg", f"image {i}",
                             {"width": width, "height": height, "aesthetic": 5.0}))
    return items


def images_per_second(root: str, images: int = 256, steps: int = 32, batch: int = 16,
                      resolution: int = 512, workers=(0, 1, 2)) -> dict[tuple[str, int], float]:
    """{(source kind, num_workers): images/s} of `steps` batches from `source.iterate(0)` over
    fixtures written under `root`."""
    from etils import epath

    from lcm_jax.data import sources
    from lcm_jax.defaults import base_config

    items = _jpeg_items(images)
    paths = {"webdataset": fx.write_webdataset(epath.Path(root) / "tar", items, per_shard=64)[0].parent,
             "parquet": fx.write_parquet(epath.Path(root) / "parquet", items, "img2dataset",
                                         per_file=128, row_group_size=16)[0].parent}
    rates = {}
    for kind, path in paths.items():
        c = base_config()
        c.batch_size, c.data.source, c.data.path, c.data.resolution = batch, kind, str(path), resolution
        src = sources.make_source(c, fx.tokenize)
        for w in workers:
            it = src.iterate(0, num_workers=w, prefetch=2)
            next(it)
            t0 = time.perf_counter()
            for _ in range(steps):
                next(it)
            rates[(kind, w)] = steps * batch / (time.perf_counter() - t0)
            it.close()
    return rates


def trainer_input_rates(root: str, steps: int = 20, batch: int = 8, workers=(0, 1)) -> dict[str, float]:
    """Examples/s of one LCD train step (a tiny diffusers teacher at 64 px, VAE encode and text
    encoder in the step) fed (a) one batch over and over (input costs nothing) and (b) the tar
    shards through `source.iterate` with each number of `workers` (0: a thread), in the same
    process: equal rates mean the step does not wait for input."""
    import jax
    from etils import epath

    from lcm_jax import sharding, train
    from lcm_jax.defaults import base_config
    from tests.tiny_pipeline import build_pipeline

    teacher = os.path.join(root, "teacher")
    build_pipeline(teacher, time_cond_proj_dim=None)
    shards = fx.write_webdataset(epath.Path(root) / "train_tar", _jpeg_items(128, 96, 128), per_shard=64)
    c = base_config()
    c.model.teacher, c.model.time_cond_proj_dim, c.batch_size = teacher, 32, batch
    c.data.source, c.data.path = "webdataset", str(shards[0].parent)
    c.data.resolution, c.data.latent_size, c.data.text_len = 64, 8, 16
    mesh = sharding.make_mesh(1, 1)
    s = train.setup(c, mesh)
    first = sharding.shard_batch(s.source.batch(0), mesh)
    step = s.step_fn.lower(s.state, s.frozen, first).compile()
    state, rates = s.state, {}
    rates["latent cache read"] = _cache_read_rate(c, s.models, os.path.join(root, "latents"), steps, batch)
    for w in (None,) + tuple(workers):
        name = "same batch" if w is None else f"tar shards, {w} worker(s)"
        stream = None if w is None else s.source.iterate(1, num_workers=w)
        state, m = step(state, s.frozen, first)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = first if stream is None else sharding.shard_batch(next(stream), mesh)
            state, m = step(state, s.frozen, batch)
        jax.block_until_ready(m)
        rates[name] = steps * batch["pixel_values"].shape[0] / (time.perf_counter() - t0)
        if stream is not None:
            stream.close()
    return rates


def _cache_read_rate(config, models, folder: str, steps: int, batch: int) -> float:
    """Examples/s of batches read back from an on-disk latent cache of the same shards."""
    from lcm_jax.training import latent_cache

    config.data.cache_size = 128
    latent_cache.build(config, folder, chunk=32, models=models, log=lambda _: None)
    cache = latent_cache.open_cache(config, folder)
    cache.batch(0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        cache.batch(step)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=512)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        rates = images_per_second(root, args.images, args.steps, args.batch, args.resolution)
        train_rates = trainer_input_rates(root)
    print(f"{'source':<12} {'workers':>7} {'images/s':>9}   ({os.cpu_count()} CPUs, "
          f"{args.resolution} px, batch {args.batch})")
    for (kind, w), r in rates.items():
        print(f"{kind:<12} {w:>7} {r:>9.1f}")
    print("\nLCD train step, tiny teacher at 64 px, batch 8 (examples/s, same process), and the"
          " latent cache's read rate:")
    for name, r in train_rates.items():
        print(f"  {name:<28} {r:8.1f}")


if __name__ == "__main__":
    main()
