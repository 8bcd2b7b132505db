"""Training sources over shards: webdataset tars, parquet, ArrayRecord. Pixels are compared with
PIL on the same bytes, captions with the written ones; batches are functions of (step, process),
the loader's stream equals batch() in a loop, filters and corrupt samples are counted."""
import grain
import ml_collections
import numpy as np
import pytest
from etils import epath

from lcm_jax.data import sources
from lcm_jax.data.paths import expand_pattern
from lcm_jax.defaults import base_config
from tests import data_fixtures as fx

RES = 32
BAD = {3: "skipped_corrupt", 5: "skipped_no_caption"}   # item index -> the counter it feeds
WRITERS = {"webdataset": fx.write_webdataset,
           "parquet": lambda root, items: fx.write_parquet(root, items, "img2dataset"),
           "parquet_hf": lambda root, items: fx.write_parquet(root, items, "hf"),
           "array_record": fx.write_array_records}


@pytest.fixture()
def data_root(tmp_path) -> epath.Path:
    """The folder the datasets are written to (any epath folder works, e.g. a gs:// bucket)."""
    return epath.Path(tmp_path)


def _config(kind, path, batch=4, seed=0, **data):
    c = base_config()
    c.batch_size, c.seed = batch, seed
    c.data.source = "parquet" if kind == "parquet_hf" else kind
    c.data.path, c.data.resolution = str(path), RES
    c.data.update(data)
    return c


def _write(kind, root, items):
    WRITERS[kind](root / kind, items)
    return root / kind


def _source(kind, root, items, **kw):
    return sources.make_source(_config(kind, _write(kind, root, items), **kw), fx.tokenize)


def _expected_counts(n, batch, step=0, seed=0):
    """Substitutions a global batch makes, walking the documented grain order."""
    order = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    counts = {"skipped_corrupt": 0, "skipped_no_caption": 0, "skipped_small": 0, "skipped_aspect": 0}
    for pos in range(step * batch, (step + 1) * batch):
        while order[pos] in BAD:
            counts[BAD[order[pos]]] += 1
            pos += 1
    return counts


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_source_yields_the_written_images_and_captions(kind, data_root):
    items = fx.make_items()
    src = _source(kind, data_root, items, batch=len(items))
    batch = src.batch(0)                                     # one epoch
    good = {it.caption: it for i, it in enumerate(items) if i not in BAD}
    captions = fx.detokenize(batch["input_ids"])
    assert set(captions) == set(good)                        # each good sample once, bad ones replaced
    for caption, pixels, size in zip(captions, batch["pixel_values"], batch["original_size"]):
        ref = fx.reference_pixels(good[caption].data, RES).astype(np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(pixels, ref, atol=1e-6)
        meta = good[caption].meta
        has_size = kind != "parquet_hf"
        want = (meta["original_height"], meta["original_width"]) if has_size else (meta["height"], meta["width"])
        assert tuple(size) == want
    assert batch["pixel_values"].dtype == np.float32 and batch["crop_top_left"].shape == (len(items), 2)
    assert src.counters() == _expected_counts(len(items), len(items))


@pytest.mark.parametrize("kind", ["webdataset", "parquet", "array_record"])
def test_shuffle_is_seeded_and_reproducible(kind, data_root):
    items = fx.make_items()
    path = _write(kind, data_root, items)
    make = lambda seed: sources.make_source(_config(kind, path, seed=seed), fx.tokenize)
    a, b, c = make(0), make(0), make(1)
    for step in (0, 5):
        np.testing.assert_array_equal(a.batch(step)["pixel_values"], b.batch(step)["pixel_values"])
        np.testing.assert_array_equal(a.batch(step)["input_ids"], b.batch(step)["input_ids"])
    assert [fx.detokenize(a.batch(s)["input_ids"]) for s in range(3)] != \
           [fx.detokenize(c.batch(s)["input_ids"]) for s in range(3)]


@pytest.mark.parametrize("processes", [2, 4])
@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_process_shares_are_disjoint_and_cover_the_data(kind, processes, data_root):
    items = fx.make_items(8, bad=False)
    src = _source(kind, data_root, items, batch=4)
    for step in range(2):
        shares = [fx.detokenize(src.batch(step, p, processes)["input_ids"]) for p in range(processes)]
        assert sum(shares, []) == fx.detokenize(src.batch(step)["input_ids"])
    epoch = [c for step in range(2) for p in range(processes)
             for c in fx.detokenize(src.batch(step, p, processes)["input_ids"])]
    assert sorted(epoch) == sorted(it.caption for it in items)       # disjoint and covering


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("kind, workers", [("webdataset", 2), ("parquet", 0), ("array_record", 1)])
def test_iterate_equals_batch_in_a_loop_and_resumes_exactly(kind, workers, data_root):
    items = fx.make_items()
    path = _write(kind, data_root, items)
    cfg = _config(kind, path, batch=4, crop="random", flip_prob=0.5)
    looped, streamed = (sources.make_source(cfg, fx.tokenize) for _ in range(2))
    want = [looped.batch(s, 1, 2) for s in range(5)]
    it = streamed.iterate(0, 1, 2, num_workers=workers, prefetch=2)
    _assert_batches_equal([next(it) for _ in range(5)], want)
    it.close()
    assert streamed.counters() == looped.counters()
    resumed = sources.make_source(cfg, fx.tokenize).iterate(3, 1, 2, num_workers=workers)
    _assert_batches_equal([next(resumed) for _ in range(2)], want[3:])
    resumed.close()


def test_random_crop_and_flip_are_seeded_by_step_and_match_pil(data_root):
    items = fx.make_items(6, bad=False)
    src = _source("webdataset", data_root, items, batch=6, crop="random", flip_prob=0.5)
    by_caption = {it.caption: it for it in items}
    batch = src.batch(2)
    flips = 0
    for caption, pixels, (top, left) in zip(fx.detokenize(batch["input_ids"]), batch["pixel_values"],
                                            batch["crop_top_left"]):
        data = by_caption[caption].data
        plain = fx.reference_pixels(data, RES, False, (top, left))
        flipped = fx.reference_pixels(data, RES, True, (top, left))
        got = np.round((pixels + 1.0) * 127.5).astype(np.uint8)
        assert np.array_equal(got, plain) or np.array_equal(got, flipped)
        flips += np.array_equal(got, flipped)
    assert 0 < flips < 6 and batch["crop_top_left"].max() > 0
    np.testing.assert_array_equal(src.batch(2)["pixel_values"], batch["pixel_values"])
    assert not np.array_equal(src.batch(3)["crop_top_left"], batch["crop_top_left"])


def test_metadata_filters_count_rejections_and_zero_samples_name_each_filter(data_root):
    items = fx.make_items()
    src = _source("webdataset", data_root, items, filters="aesthetic>=6.0,punsafe<=0.25")
    aesthetic = sum(1 for it in items if it.meta.get("aesthetic", -1) < 6.0)
    punsafe = sum(1 for it in items if it.meta["punsafe"] > 0.25)
    assert src.filter_report.rejected == {"aesthetic>=6.0": aesthetic, "punsafe<=0.25": punsafe}
    assert src.filter_report.missing == {"aesthetic>=6.0": 1, "punsafe<=0.25": 0}
    kept = {it.caption for it in items if it.meta.get("aesthetic", -1) >= 6.0 and it.meta["punsafe"] <= 0.25}
    seen = {c for s in range(6) for c in fx.detokenize(src.batch(s)["input_ids"])}
    assert seen <= kept and len(seen) >= len(kept) - 1      # the caption-less item may be filtered in
    path = data_root / "webdataset"
    with pytest.raises(ValueError) as e:
        sources.make_source(_config("webdataset", path, filters="aesthetic>=100,punsafe<=0.25"), fx.tokenize)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert f"12 indexed, 0 kept; aesthetic>=100 rejected 12 (1 without the field); punsafe<=0.25 rejected {punsafe}" in msg
    with pytest.raises(ValueError, match="data.filters clause 'aesthetic>5'"):
        sources.make_source(_config("webdataset", path, filters="aesthetic>5"), fx.tokenize)


def test_min_size_reads_metadata_or_else_the_decoded_image(data_root):
    items = fx.make_items(8, bad=False)
    small = sum(1 for it in items if min(it.meta["original_height"], it.meta["original_width"]) < 90)
    src = _source("webdataset", data_root, items, min_size=90)
    assert src.filter_report.rejected == {"min_size=90": small} and src.length == 8 - small
    hf = _source("parquet_hf", data_root, items, batch=8, min_size=45)       # no size columns
    order = grain.MapDataset.range(8).shuffle(seed=0).repeat()
    too_small = {i for i, it in enumerate(items) if min(it.meta["height"], it.meta["width"]) < 45}
    expected = 0
    for pos in range(8):
        while order[pos] in too_small:
            expected, pos = expected + 1, pos + 1
    batch = hf.batch(0)
    assert hf.counters()["skipped_small"] == expected > 0
    assert batch["original_size"].min() >= 45


def test_index_is_cached_beside_the_shards_or_in_index_dir(data_root):
    items = fx.make_items(8, bad=False)
    path = _write("webdataset", data_root, items)
    index_dir = data_root / "indexes"
    a = sources.make_source(_config("webdataset", path, index_dir=str(index_dir)), fx.tokenize)
    assert len(list(index_dir.glob("*.index.json"))) == 2 and not list(path.glob("*.index.json"))
    b = sources.make_source(_config("webdataset", path), fx.tokenize)
    assert sorted(p.name for p in path.glob("*.index.json")) == ["00000.tar.index.json", "00001.tar.index.json"]
    np.testing.assert_array_equal(a.batch(1)["pixel_values"], b.batch(1)["pixel_values"])


def test_brace_patterns_and_globs_expand(data_root):
    items = fx.make_items(12, bad=False)
    path = _write("webdataset", data_root, items)
    names = [p.name for p in expand_pattern(f"{path}/{{00000..00001}}.tar", ".tar")]
    assert names == ["00000.tar", "00001.tar"]
    assert [p.name for p in expand_pattern(f"{path}/*.tar", ".tar")] == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(expand_pattern(str(path), ".tar")) == 3
    src = sources.make_source(_config("webdataset", f"{path}/{{00001..00002}}.tar", batch=8), fx.tokenize)
    assert sorted(fx.detokenize(src.batch(0)["input_ids"])) == sorted(it.caption for it in items[4:])
    with pytest.raises(FileNotFoundError, match="shard .*00003.tar does not exist"):
        sources.make_source(_config("webdataset", f"{path}/{{00001..00007}}.tar"), fx.tokenize)


def test_record_format_round_trips():
    from lcm_jax.data import records

    pixels = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    rec = records.decode_record(records.encode_record(pixels, "a cat", {"aesthetic": 6.5}))
    np.testing.assert_array_equal(rec["pixels"], pixels)
    assert rec["caption"] == "a cat" and rec["meta"] == {"aesthetic": 6.5}
    assert records.decode_record(records.encode_record(b"\xff\xd8", None)) == {"image": b"\xff\xd8"}


def test_new_data_fields_survive_the_json_round_trip():
    c = base_config()
    c.data.filters = "aesthetic>=5.0,punsafe<=0.5"
    back = ml_collections.ConfigDict(__import__("json").loads(c.to_json()))
    assert back.data.to_dict() == c.data.to_dict()
