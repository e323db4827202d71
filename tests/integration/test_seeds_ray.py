"""``train.seeds`` in one real Ray Train run with two seeds: two Train runs ``.../seed=S``, a fold run per
(fold, seed) each holding its model (moved here from tests/unit/test_seeds.py, which checks the summaries, the
logged series, the tables and the flags without Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow import MlflowClient

from ser_platform import tracking
from ser_platform.config import load_config
from ser_platform.ray_train import format_result, train_folds

from support import TINY_SIZES

TINY = {
    **TINY_SIZES,
    "train.batch_size": 8, "train.samples_per_class": 2, "train.lr": 3e-3, "train.epochs": 1, "train.seed": 3,
    "train.seeds": 2, "data.max_audio_seconds": 1.0, "data.folds": (1, 2), "tracking.experiment": "seeds-ray",
}


def test_train_folds_runs_every_fold_per_seed_and_logs_a_fold_run_each(training_dataset, ray_cluster, tmp_path):
    uri = tracking.ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = load_config("demo", overrides={**TINY, "data.dataset": training_dataset, "tracking.mlflow_uri": uri})
    result = train_folds(config, run_name="seeds-test", storage_path=str(tmp_path / "runs"))
    assert sorted(result.per_seed) == [3, 4] and sorted(result.runs()) == [(1, 3), (1, 4), (2, 3), (2, 4)]
    assert result.per_fold == result.per_seed[3]
    # Different seeds, different models (the runs are not copies of each other).
    assert result.per_seed[3][1].history[0]["train_loss"] != result.per_seed[4][1].history[0]["train_loss"]
    every = [r.test_ua for r in result.runs().values()]
    assert result.summary["test_ua_mean"] == pytest.approx(np.mean(every))
    assert result.summary["num_seeds"] == 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == ["seeds-test"]
    assert sorted(p.name for p in (tmp_path / "runs" / "seeds-test").iterdir()) == ["seed=3", "seed=4"]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("seeds-ray").experiment_id
    folds = client.search_runs([exp], "tags.`ser.role` = 'fold'")
    assert sorted((r.data.tags["ser.fold"], r.data.tags["ser.seed"]) for r in folds) == \
        [("1", "3"), ("1", "4"), ("2", "3"), ("2", "4")]
    for run in folds:
        assert run.data.params["train.seed"] == run.data.tags["ser.seed"]
        assert run.data.metrics["test_ua"] == pytest.approx(
            result.per_seed[int(run.data.tags["ser.seed"])][int(run.data.tags["ser.fold"])].test_ua)
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/state_dict.pt"}
    text = format_result(result)
    assert "2 fold(s) × 2 seeds" in text and "spread over seeds" in text
