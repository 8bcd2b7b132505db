"""Training inputs: image folders with metadata.jsonl, step-addressed batches, process shards."""
import json

import numpy as np
import pytest
from PIL import Image

from lcm_jax.data import sources


def _tokenize(captions):
    return np.array([[len(c), len(c.split())] for c in captions], np.int32)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(tmp_path / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": "word " * (i + 1)}) + "\n")
    return str(tmp_path)


def _source(folder, batch=4, seed=0):
    read, n = sources.folder_examples(folder, resolution=32)
    return sources.ImageCaptionSource(read, n, batch, _tokenize, seed=seed, name=folder)


def test_folder_batches_are_functions_of_the_step(folder):
    a, b = _source(folder), _source(folder)
    x, y = a.batch(3), b.batch(3)
    assert x["pixel_values"].shape == (4, 32, 32, 3)
    assert x["pixel_values"].min() >= -1 and x["pixel_values"].max() <= 1
    np.testing.assert_array_equal(x["pixel_values"], y["pixel_values"])
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    assert not np.array_equal(a.batch(4)["input_ids"], x["input_ids"])
    assert not np.array_equal(_source(folder, seed=1).batch(3)["input_ids"], x["input_ids"])


def test_epochs_cover_every_example_once(folder):
    src = _source(folder, batch=5)
    words = np.concatenate([src.batch(s)["input_ids"][:, 1] for s in range(2)])
    assert sorted(words) == list(range(1, 11))


def test_processes_read_disjoint_halves_of_the_global_batch(folder):
    src = _source(folder)
    full = src.batch(2)["input_ids"]
    halves = [src.batch(2, p, 2)["input_ids"] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), full)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        src.batch(0, 0, 3)


def test_synthetic_source_splits_like_the_folder_source():
    src = sources.SyntheticLatents(4, (2, 2, 4), (3, 8), seed=1)
    full = src.batch(5)
    half = src.batch(5, 1, 2)
    np.testing.assert_array_equal(half["latents"], full["latents"][2:])
    assert src.uncond_embeds().shape == (1, 3, 8)


@pytest.mark.parametrize("write, match", [
    (None, "has no metadata.jsonl"),
    ("not json\n", "line 1: expected a JSON object"),
    ('{"file_name": "x.png"}\n', "line 1: expected a JSON object with 'file_name' and 'text'"),
    ('{"file_name": "gone.png", "text": "a"}\n', "names images that do not exist"),
    ("\n", "lists no images"),
])
def test_bad_folders_name_the_problem(tmp_path, write, match):
    if write is not None:
        (tmp_path / "metadata.jsonl").write_text(write)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        sources.read_image_folder(str(tmp_path))


def test_empty_source_is_an_error():
    with pytest.raises(ValueError, match="yields no samples"):
        sources.ImageCaptionSource(lambda i: None, 0, 4, _tokenize, name="my/filtered/set")


def test_shapes_source_is_registered_by_its_world_and_reads_it():
    import ml_collections

    import lcm_jax.worlds.shapes  # noqa: F401  (registers 'shapes')
    from lcm_jax.worlds.shapes.world import ShapesWorld

    assert {"synthetic", "folder", "shapes"} <= set(sources.source_names())
    cfg = ml_collections.ConfigDict({"seed": 0, "batch_size": 4, "data": {
        "source": "shapes", "world_seed": 0, "num_examples": 100}})
    src = sources.make_source(cfg, lambda caps: np.zeros((len(caps), 3), np.int32))
    batch = src.examples([7])
    image, caption, _ = ShapesWorld(0).sample(7)
    np.testing.assert_allclose(batch["pixel_values"][0], image.astype(np.float32) / 127.5 - 1.0)
    assert caption.startswith("a ") and "background" in caption


def test_unknown_source_names_the_registered_ones():
    import ml_collections

    cfg = ml_collections.ConfigDict({"data": {"source": "webdatset"}})
    with pytest.raises(ValueError, match=r"data.source='webdatset' unknown; choose one of \(.*'folder'"):
        sources.make_source(cfg)
