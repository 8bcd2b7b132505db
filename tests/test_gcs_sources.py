"""Input from a bucket: the webdataset and parquet sources on gs:// (the GCS emulator) yield the
same batches, counters and filter errors as the same files on local disk."""
import numpy as np
import pytest
from etils import epath

import data_fixtures as fx
from gcs_emulator import gcs_bucket, gcs_server  # noqa: F401  (pytest fixtures)
from test_sources import WRITERS, _config

from lcm_jax.data import sources


@pytest.mark.parametrize("kind", ["webdataset", "parquet", "parquet_hf"])
def test_a_bucket_reads_like_local_disk(gcs_bucket, tmp_path, kind):  # noqa: F811
    items = fx.make_items(12)
    local, remote = epath.Path(tmp_path) / kind, epath.Path(gcs_bucket) / kind
    WRITERS[kind](local, items)
    WRITERS[kind](remote, items)
    a = sources.make_source(_config(kind, local), fx.tokenize)
    b = sources.make_source(_config(kind, remote, index_dir=str(tmp_path / "index")), fx.tokenize)
    for step in range(6):  # 24 draws of 12 examples: the truncated JPEG and the captionless one
        x, y = a.batch(step), b.batch(step)
        assert sorted(x) == sorted(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert a.counters() == b.counters() and sum(b.counters().values()) > 0
    with pytest.raises(ValueError, match=r"aesthetic>=100.* rejected 12"):
        sources.make_source(_config(kind, remote, filters="aesthetic>=100"), fx.tokenize)
