"""The trainer on real image-caption input: a tiny LCD distilled from a tiny diffusers folder,
reading img2dataset tar shards (with one truncated JPEG and one sample without a caption) through
the source's prefetching iterator; the skipped samples are counted in metrics.jsonl."""
import json
import os

import numpy as np
from etils import epath

from data_fixtures import make_items, write_webdataset
from tiny_pipeline import build_pipeline


def _config(teacher: str, shards: str):
    from lcm_jax.defaults import base_config

    c = base_config()
    c.method, c.model.teacher, c.model.time_cond_proj_dim = "lcd", teacher, 32
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 6, 4, 2, 6
    c.async_checkpointing = False
    c.optim.learning_rate, c.optim.warmup_steps = 1e-4, 0
    c.data.source, c.data.path = "webdataset", shards
    c.data.resolution, c.data.latent_size, c.data.text_len = 64, 8, 16
    return c


def test_lcd_on_tar_shards_counts_the_skipped_samples(tmp_path):
    from lcm_jax import train
    from lcm_jax.data import make_source

    teacher = str(tmp_path / "teacher")
    build_pipeline(teacher, time_cond_proj_dim=None)
    shards = tmp_path / "shards"
    write_webdataset(epath.Path(shards), make_items(12))
    config = _config(teacher, str(shards))
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 6
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in rows)
    # 6 steps x 4 examples read 24 draws of 12 examples: the bad two are met and replaced
    assert rows[-1]["skipped_corrupt"] >= 1 and rows[-1]["skipped_no_caption"] >= 1
    fresh = make_source(config, lambda caps: np.zeros((len(caps), 16), np.int32))
    for step in range(6):
        fresh.batch(step)
    assert fresh.counters()["skipped_corrupt"] == rows[-1]["skipped_corrupt"]  # the same draws
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "6")


def test_caption_dropout_empties_prompts_for_every_method():
    import jax

    from lcm_jax.defaults import base_config
    from lcm_jax.training.step import make_encode

    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((64, 2, 2, 4)).astype(np.float32),
             "prompt_embeds": rng.standard_normal((64, 3, 8)).astype(np.float32)}
    frozen = {"uncond_embeds": np.zeros((1, 3, 8), np.float32)}
    for method in ("lcd", "lcm_lora", "diffusion"):
        c = base_config()
        c.method, c.data.caption_dropout = method, 0.25
        out = make_encode(c, None)(frozen, batch, jax.random.PRNGKey(1))
        dropped = np.all(np.asarray(out["prompt_embeds"]) == 0, axis=(1, 2))
        kept = np.all(np.asarray(out["prompt_embeds"]) == batch["prompt_embeds"], axis=(1, 2))
        assert np.all(dropped | kept) and 4 <= dropped.sum() <= 28, (method, dropped.sum())


def test_tar_shards_into_the_latent_cache_and_back(tmp_path):
    """lcm-jax cache over tar shards: examples in dataset order (the bad two replaced by their
    next index), and a run trains from the cache."""
    from lcm_jax import train
    from lcm_jax.data import make_source
    from lcm_jax.training import latent_cache
    from lcm_jax.training.models import build_models

    teacher = str(tmp_path / "teacher")
    build_pipeline(teacher, time_cond_proj_dim=None)
    write_webdataset(epath.Path(tmp_path / "shards"), make_items(12))
    config = _config(teacher, str(tmp_path / "shards"))
    config.data.cache_size = 12
    models = build_models(config)
    out = latent_cache.build(config, str(tmp_path / "latents"), chunk=5, models=models)
    cache = latent_cache.open_cache(config, out)
    source = make_source(config, lambda caps: np.zeros((len(caps), 16), np.int32))
    raw = source.examples([2, 3, 4])        # 3 is the truncated JPEG: replaced by 4
    assert source.counters()["skipped_corrupt"] == 1
    np.testing.assert_array_equal(raw["pixel_values"][1], raw["pixel_values"][2])
    got = cache.examples([2, 3, 4])
    assert got["latents"].shape == (3, 8, 8, 4) and got["prompt_embeds"].shape[1] == 16
    config.data.cache_dir, config.total_steps = out, 2
    assert int(train.train_and_evaluate(config, str(tmp_path / "run")).step) == 2
