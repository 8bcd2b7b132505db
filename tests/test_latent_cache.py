"""The on-disk latent cache (`lcm-jax cache`, lcm_jax.data.disk_cache): what it stores equals the
frozen VAE and text encoder's output, a cache of other models or data is refused naming what
differs, and a killed job resumes to the same bytes as an uninterrupted one."""
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax.data import disk_cache
from lcm_jax.training import latent_cache
from lcm_jax.worlds.shapes.configs.shapes_lcd import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, CHUNK = 40, 16   # three shards: 16, 16, 8 examples


def _config(**data):
    c = get_config()
    c.data.num_examples, c.data.cache_size = 48, SIZE
    c.data.update(data)
    return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from lcm_jax.training.models import build_models

    config, out = _config(), str(tmp_path_factory.mktemp("cache") / "latents")
    models = build_models(config)
    latent_cache.build(config, out, chunk=CHUNK, models=models)
    return config, models, out


def test_cached_latents_are_the_vaes_and_the_text_encoders(built):
    config, models, out = built
    cache = latent_cache.open_cache(config, out)
    assert cache.length == SIZE and len(os.listdir(out)) == 1 + 3
    source = latent_cache.source_for_cache(config, models)
    idx = [0, 17, 39]
    got, raw = cache.examples(idx), source.examples(idx)
    post = models.vae.apply({"params": models.frozen["vae"]}, jnp.asarray(raw["pixel_values"]), method="encode")
    z = got["latents"] / models.vae.scaling_factor   # one posterior draw: within a few std of the mean
    dev = np.abs(z - np.asarray(post.mean)) / np.exp(0.5 * np.asarray(post.logvar))
    assert dev.max() < 6 and 0.5 < dev.mean() < 1.2, (dev.max(), dev.mean())
    text = models.text_encoder.apply({"params": models.frozen["text_encoder"]}, jnp.asarray(raw["input_ids"]))
    np.testing.assert_allclose(got["prompt_embeds"], np.asarray(text.last_hidden_state), rtol=1e-5, atol=1e-5)
    b = cache.batch(3)
    assert b["latents"].shape == (config.batch_size, 8, 8, 4)
    np.testing.assert_array_equal(b["latents"], cache.batch(3)["latents"])          # a function of the step
    halves = [cache.batch(3, p, 2)["latents"] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), b["latents"])               # process shares


@pytest.mark.parametrize("change, field", [
    (dict(world_seed=1), "data.world_seed: cache has 0, config needs 1"),
    (dict(resolution=128, latent_size=16), "resolution: cache has 64, config needs 128"),
])
def test_a_cache_of_other_data_is_refused_naming_the_field(built, change, field):
    _, _, out = built
    with pytest.raises(disk_cache.CacheMismatchError, match=field.replace(".", r"\.")):
        latent_cache.open_cache(_config(**change), out)
    with pytest.raises(disk_cache.CacheMismatchError, match="does not match the config"):
        latent_cache.build(_config(**change), out, chunk=CHUNK)


def _records(folder):
    n = -(-SIZE // CHUNK)
    return [open(os.path.join(folder, disk_cache.shard_name(i, n)), "rb").read() for i in range(n)]


def test_a_killed_cache_job_resumes_to_the_uninterrupted_result(built, tmp_path):
    _, _, whole = built
    out = str(tmp_path / "resumed")
    cmd = [sys.executable, "-m", "lcm_jax.cli", "cache", "--config",
           os.path.join(ROOT, "lcm_jax", "worlds", "shapes", "configs", "shapes_lcd.py"), "--out", out,
           "--chunk", str(CHUNK), "--set", "data.num_examples=48", "--set", f"data.cache_size={SIZE}"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(out, disk_cache.shard_name(0, 3))
    deadline = time.time() + 300
    while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert os.path.exists(first), "the job wrote no shard before it was killed"
    left = [f for f in os.listdir(out) if f.endswith(".array_record")]
    assert len(left) < 3, f"killed too late to test resuming: {left}"
    out2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out2.returncode == 0, out2.stderr[-2000:]
    assert _records(out) == _records(whole)   # byte for byte


def test_training_reads_the_cache(built):
    from lcm_jax import sharding, train

    config, _, out = built
    config.data.cache_dir, config.batch_size = out, 8
    s = train.setup(config, sharding.make_mesh(1, 1))
    state, metrics = s.step_fn(s.state, s.frozen, s.source.batch(0))
    assert int(state.step) == 1 and bool(metrics["finite"])


def test_cli_cache_refuses_a_file_as_out(tmp_path, capsys):
    from lcm_jax import cli

    path = tmp_path / "file"
    path.write_text("keep")
    cfg = os.path.join(ROOT, "lcm_jax", "worlds", "shapes", "configs", "shapes_lcd.py")
    assert cli.main(["cache", "--config", cfg, "--out", str(path), "--set", "data.cache_size=8"]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err and path.read_text() == "keep"
