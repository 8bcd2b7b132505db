"""`lcm-jax cache`: encode a run's dataset once with its frozen VAE and text encoder(s) into an
on-disk latent cache (`lcm_jax.data.disk_cache`), resumable, sharded over processes and devices.

Process p encodes shards p, p + P, ...; a chunk's VAE posterior draw is fold_in(key, shard), so
the result does not depend on the number of processes or on interruptions.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Optional

import jax

from lcm_jax import sharding
from lcm_jax.data import disk_cache
from lcm_jax.data.sources import make_source
from lcm_jax.training.metrics import eta, main_process_print
from lcm_jax.training.models import Models, build_models, tokenize_fn
from lcm_jax.training.step import make_encode

CACHE_SEED_OFFSET = 2   # the VAE posterior draws: PRNGKey(config.seed + 2), as the in-memory cache
DEFAULT_CHUNK = 256


def source_for_cache(config, models: Models):
    ucfg = models.unet.config
    latent_shape = (config.data.latent_size, config.data.latent_size, ucfg.in_channels)
    return make_source(config, tokenize_fn(models), latent_shape, (config.data.text_len, ucfg.cross_attention_dim[0]))


def default_dir(manifest: dict) -> str:
    """Where the trainer keeps the cache it makes itself (data.cache_size > 0, no data.cache_dir):
    $LCM_JAX_LATENT_CACHE_DIR (default ~/.cache/lcm_jax/latents) / the manifest's hash, so a
    restarted or second run over the same models and data finds it."""
    root = os.environ.get("LCM_JAX_LATENT_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "lcm_jax", "latents"))
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root, key)


def build(config, out: Optional[str] = None, chunk: int = DEFAULT_CHUNK, models: Optional[Models] = None,
          every_process: bool = False, log: Callable[[str], None] = main_process_print) -> str:
    """Encodes examples [0, data.cache_size) of the config's source into `out` (None:
    `default_dir`); returns the folder. An existing cache of the same manifest is completed, not
    redone; one of another manifest is refused. Processes split the shards, unless
    `every_process` (each encodes all of them into its own folder: no shared filesystem needed)."""
    if not config.data.cache_size:
        raise ValueError("data.cache_size=0: set --config.data.cache_size=N, the number of examples to encode")
    models = models or build_models(config)
    if models.vae is None:
        raise ValueError("the latent cache needs a VAE: set model.teacher (or model.components) to a "
                         "diffusers pipeline folder")
    source = source_for_cache(config, models)
    size = min(int(config.data.cache_size), getattr(source, "length", config.data.cache_size))
    manifest = disk_cache.manifest_for(config, size, chunk)
    out = out or default_dir(manifest)
    _start(out, manifest, shared=not every_process)
    n = -(-size // chunk)
    mine = range(n) if every_process else range(jax.process_index(), n, jax.process_count())
    todo = [i for i in mine if not os.path.exists(os.path.join(out, disk_cache.shard_name(i, n)))]
    encode = _encoder(config, models)
    key = jax.random.PRNGKey(config.seed + CACHE_SEED_OFFSET)
    t0, pending = time.time(), None

    def write(done: int, i: int, arrays) -> None:
        disk_cache.write_shard(out, i, n, i * chunk, disk_cache.flatten(jax.device_get(arrays)))
        rate = done / max(time.time() - t0, 1e-9)
        log(f"latent cache: shard {i + 1}/{n} of {out} ({rate * chunk:.0f} examples/s, "
            f"ETA {eta(done, len(todo), rate)})")

    for done, i in enumerate(todo, 1):
        raw = source.examples(range(i * chunk, min((i + 1) * chunk, size)))
        arrays = encode(raw, jax.random.fold_in(key, i))  # dispatched: runs while the last shard is written
        if pending is not None:
            write(*pending)
        pending = (done, i, arrays)
    if pending is not None:
        write(*pending)
    if not todo:
        log(f"latent cache: {out} is complete ({size} examples)")
    if not every_process:
        sharding.barrier("lcm_jax_latent_cache")
    return out


def _start(out: str, manifest: dict, shared: bool) -> None:
    """Writes the manifest of a new cache (process 0 of a shared folder), or checks an existing one."""
    if os.path.isfile(out):
        raise FileExistsError(f"--out {out} is a file; give a folder for the latent cache")
    if os.path.exists(os.path.join(out, disk_cache.MANIFEST)):
        disk_cache.check_manifest(out, manifest)
        return
    if not shared or jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        tmp = os.path.join(out, f"{disk_cache.MANIFEST}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(out, disk_cache.MANIFEST))
    if shared:
        sharding.barrier("lcm_jax_latent_cache_manifest")


def _encoder(config, models: Models):
    """(raw batch, key) -> latents and text embeddings: the frozen encoders, jitted, the batch split
    over this process's devices when it divides."""
    encode = make_encode(config, models, with_uncond=False)
    mesh = sharding.make_mesh(jax.local_device_count(), 1, jax.local_devices())
    frozen = jax.device_put(models.frozen, sharding.replicated(mesh))
    jitted = jax.jit(lambda raw, key: encode(frozen, raw, key))

    def run(raw, key):
        if len(next(iter(raw.values()))) % jax.local_device_count() == 0:
            raw = jax.device_put(raw, sharding.batch_sharding(mesh))
        return jitted(raw, key)
    return run


def open_cache(config, folder: str) -> disk_cache.DiskLatentCache:
    """The on-disk cache in `folder` as the run's source, refused when it was made from other
    models or data than the config's."""
    found = disk_cache.read_manifest(folder)
    expected = disk_cache.manifest_for(config, found["num_examples"], found["chunk"])
    return disk_cache.DiskLatentCache(folder, config.batch_size, seed=config.seed, expected=expected)
