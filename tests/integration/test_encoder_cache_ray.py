"""The frozen-encoder cache through Ray Train: ``train_folds`` on the cache gives the fold results of running the
frozen encoders, and a stale cache stops it (moved here from tests/unit/test_encoder_cache.py, which checks the
layout, the equivalence through the plain loop and every staleness case without Ray)."""

from __future__ import annotations

import shutil

import pytest

from ser_platform import tracking
from ser_platform.config import load_config
from ser_platform.data.encoder_cache import StaleCacheError
from ser_platform.frozen_encoders import build_encoder_cache
from ser_platform.ray_train import train_folds

from support import CACHE_TINY, comparable


def tiny_config(**overrides):
    return load_config("demo", overrides={**CACHE_TINY, **overrides})


@pytest.fixture(scope="module")
def dataset(training_dataset, tmp_path_factory) -> str:
    """A copy of the shared training dataset with the tiny encoders' cache (layers -1 and 0) built beside it, as
    tests/unit/test_encoder_cache.py builds it."""
    copy = shutil.copytree(training_dataset, tmp_path_factory.mktemp("cache") / "parquet").as_posix()
    build_encoder_cache(tiny_config(), copy, layers={"text": (-1, 0), "speech": (-1, 0)}, batch_size=8,
                        progress=False, log=None)
    return copy


def test_ray_train_on_the_cache_matches_ray_train_running_the_encoders(dataset, ray_cluster, tmp_path):
    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = tiny_config(**{"data.dataset": dataset, "data.folds": (1,), "tracking.mlflow_uri": uri,
                            "tracking.experiment": "cache-tests"})
    running = train_folds(config, run_name="running", storage_path=str(tmp_path / "storage"))
    served = train_folds(config.replace({"data.encoder_cache": "auto"}), run_name="served",
                         storage_path=str(tmp_path / "storage"))
    with pytest.raises(StaleCacheError, match="max_text_tokens"):
        train_folds(config.replace({"data.encoder_cache": "auto", "data.max_text_tokens": 16}), run_name="stale",
                    storage_path=str(tmp_path / "storage"))
    a, b = comparable(running.per_fold[1]), comparable(served.per_fold[1])
    a.pop("resumed_from"), b.pop("resumed_from")
    for ha, hb in zip(a.pop("history"), b.pop("history")):
        assert ha == pytest.approx(hb, rel=1e-4, abs=1e-5)
    assert a == b
