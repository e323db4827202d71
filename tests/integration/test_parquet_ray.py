"""The Parquet dataset read by Ray Data (moved here from tests/unit/test_parquet.py, which checks the dataset itself
against the parser, soundfile and librosa)."""

from __future__ import annotations

import numpy as np


def test_ray_data_reads_the_dataset(featured_dataset, ray_cluster):
    import ray
    from ray.data.expressions import col

    summary, path, table = featured_dataset
    ds = ray.data.read_parquet(str(path))
    assert ds.count() == summary["utterances"]
    assert ds.schema().names == table.schema.names  # _common_metadata is not read as data
    batch = ds.filter(expr=col("session") == 2).take_batch(4, batch_format="numpy")
    assert set(batch["session"]) == {2}
    assert batch["audio"][0].dtype == np.float32
