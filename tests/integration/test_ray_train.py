"""Ray Data -> Ray Train end to end on a tiny synthetic corpus, on the session's local Ray instance.

What is checked, and against what:
* fold splits in Ray Data: the speakers of ``fold_spec`` and the row counts pyarrow reads directly;
* per-epoch shuffles: every row once, same seed same order, new seed new order;
* 1 worker (trainer_scope "trial") and 2 workers (DDP over gloo, trainer_scope "fold"), folds 1 and 2;
* MLflow through ``MlflowClient``: the run tree (``mlflow.parentRunId``), params, per-epoch and final metrics
  (equal to the returned results), artifacts;
* reproducibility and recovery in one second run of the same config: its fold 1 (trained from scratch) gives
  the first run's results; its fold 2's worker is SIGKILLed mid-epoch, and the fold continues from its last
  checkpoint and ends exactly as the uninterrupted run did, with one MLflow run per fold;
* the leakage guard and an unreachable tracking server stop the run before any trainer starts.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from ser_platform import tracking
from ser_platform.config import load_config
from ser_platform.data import folds as folds_module
from ser_platform.data.folds import FoldLeakageError, FoldSpec, fold_spec
from ser_platform.data.loader import fold_datasets, make_collate, train_batches
from ser_platform.data.parquet import read_summary
from ser_platform.models.text import build_tokenizer
from ser_platform.ray_train import FAULT_ENV, train_folds

from support import TINY_SIZES
from support import comparable as without_timings

TINY = {
    **TINY_SIZES,
    "train.batch_size": 8, "train.samples_per_class": 2, "train.lr": 3e-3, "train.epochs": 2, "train.seed": 3,
    "data.max_audio_seconds": 1.0, "data.folds": (1, 2), "tracking.experiment": "ray-tests",
}


@pytest.fixture(scope="module")
def dataset(training_dataset) -> str:
    return training_dataset  # tests/conftest.py: read only, shared with the other training tests


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def mlflow_uri(workdir) -> str:
    return tracking.ensure_store(f"sqlite:///{workdir / 'mlflow.db'}")


def config_for(dataset: str, mlflow_uri: str, **overrides):
    return load_config("demo", overrides={**TINY, "data.dataset": dataset, "tracking.mlflow_uri": mlflow_uri,
                                          **overrides})


def session_rows(dataset: str, session: int) -> int:
    """Rows of one session, read by pyarrow directly (the independent count of a loso5 test split)."""
    return pq.read_table(dataset, columns=["session"]).column("session").to_pylist().count(session)


def comparable(result) -> dict:
    """support.comparable, also without ``resumed_from`` (where a recovered fold restarted is allowed to differ)."""
    values = without_timings(result)
    values.pop("resumed_from")
    return values


# The worker CPU share (no Ray needed): tests/unit/test_worker_cpus.py.

# --- Ray Data ----------------------------------------------------------------------------------------------

def test_fold_splits_hold_the_specs_speakers(ray_cluster, dataset):
    table = pq.read_table(dataset, columns=["id", "speaker"]).to_pydict()
    spec = fold_spec(2)
    splits = fold_datasets(dataset, spec, materialize=True)
    for name, speakers in (("train", spec.train_speakers), ("val", spec.val_speakers), ("test", spec.test_speakers)):
        rows = splits[name].select_columns(["id", "speaker"]).take_all()
        expected = sorted(i for i, s in zip(table["id"], table["speaker"]) if s in speakers)
        assert sorted(r["id"] for r in rows) == expected and expected
        assert {r["speaker"] for r in rows} <= speakers


@pytest.mark.parametrize("samples_per_class", [0, 2])
def test_training_order_is_new_each_epoch_and_fixed_by_the_seed(ray_cluster, dataset, samples_per_class):
    train = fold_datasets(dataset, fold_spec(1), materialize=True)["train"]
    config = load_config("demo", overrides=TINY)
    collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=32, max_audio_samples=16000)

    def epoch(seed):
        return [i for b in train_batches(train, collate, batch_size=8, seed=seed, samples_per_class=samples_per_class)
                for i in b["ids"]]

    first, again, other = epoch(11), epoch(11), epoch(12)
    assert sorted(first) == sorted(train.unique("id")) and len(set(first)) == len(first)
    assert first == again
    assert first != other


# --- Ray Train end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_worker_run(ray_cluster, dataset, mlflow_uri, workdir):
    config = config_for(dataset, mlflow_uri)
    started = time.perf_counter()
    result = train_folds(config, run_name="one-worker", storage_path=str(workdir / "storage"))
    return config, result, time.perf_counter() - started


def test_one_worker_trial_runs_both_folds_and_logs_everything_to_mlflow(one_worker_run, mlflow_uri, workdir, dataset):
    config, result, _ = one_worker_run
    assert sorted(result.per_fold) == [1, 2]
    for fold, r in result.per_fold.items():
        assert r.epochs_run == 2 and 1 <= r.best_epoch <= 2 and 0 <= r.test_ua <= 1
        in_session = session_rows(dataset, fold)  # fold k tests on session k, both speakers
        assert r.num_test == in_session and sum(map(sum, r.confusion)) == in_session
        assert r.resumed_from == []
    assert result.summary["test_ua_mean"] == pytest.approx(np.mean([r.test_ua for r in result.per_fold.values()]))

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("ray-tests").experiment_id
    [own] = client.search_runs([exp], filter_string="tags.`ser.train_run` = 'one-worker' and tags.`ser.role` = 'train'")
    assert own.info.status == "FINISHED"
    assert own.data.params["loss.alpha"] == str(config.loss.alpha)
    assert own.data.params["git_commit"] == tracking.git_commit()
    assert own.data.params["dataset_fingerprint"] == tracking.dataset_fingerprint(dataset, read_summary(dataset))
    assert own.data.metrics["test_ua_mean"] == pytest.approx(result.summary["test_ua_mean"])
    assert "config.yaml" in [a.path for a in client.list_artifacts(own.info.run_id)]

    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{own.info.run_id}'")
    assert sorted(c.data.tags["ser.fold"] for c in children) == ["1", "2"]
    for child in children:
        fold = int(child.data.tags["ser.fold"])
        r = result.per_fold[fold]
        assert child.info.status == "FINISHED" and child.data.params["fold"] == str(fold)
        # The UI keys of a `ser train` run, on it and on its fold runs alike (no table or variant: not a sweep).
        for run in (own, child):
            assert (run.data.params["protocol"], run.data.params["folds"], run.data.params["seeds"]) == (
                config.data.protocol, ",".join(map(str, config.data.folds)), str(config.train.seeds))
            assert "table" not in run.data.params
        assert child.data.metrics["test_ua"] == pytest.approx(r.test_ua)
        assert child.data.metrics["test_wa"] == pytest.approx(r.test_wa)
        assert child.data.metrics["best_epoch"] == r.best_epoch
        for key in ("train_loss", "train_metric_loss", "train_ce_loss", "val_ua", "val_wa", "epoch_time_s"):
            history = client.get_metric_history(child.info.run_id, key)
            assert sorted(m.step for m in history) == [1, 2], key
        assert [m.value for m in sorted(client.get_metric_history(child.info.run_id, "val_ua"),
                                        key=lambda m: m.step)] == pytest.approx([h["val_ua"] for h in r.history])
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"confusion_test.json", "confusion_test.png", "config.yaml", "fold_result.json"} <= artifacts
    # A checkpoint per report went to the run's storage; the latest one is kept.
    assert list((workdir / "storage" / "one-worker").glob("fold02-done"))


def test_a_second_run_reproduces_the_first_and_a_killed_worker_resumes_from_its_checkpoint(
        one_worker_run, dataset, mlflow_uri, workdir, monkeypatch):
    """One second run of the module's configuration checks both (a separate run for reproducibility alone cost
    ~45 s of Ray Train start-up and training): its fold 1 trains from scratch in a new trainer with the same
    seed and config, and must end exactly as the first run's; its fold 2 loses its worker mid-epoch and must
    still end exactly as the first run's."""
    config, uninterrupted, _ = one_worker_run
    pid_file = workdir / "worker.pid"
    monkeypatch.setenv(FAULT_ENV, f"2:2:{pid_file}")  # rank 0 announces itself at fold 2, epoch 2, and waits
    killed: list[int] = []

    def kill_when_announced():
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not pid_file.exists():
            time.sleep(0.2)
        if pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_announced, daemon=True)
    killer.start()
    result = train_folds(config, run_name="killed", storage_path=str(workdir / "storage"))
    killer.join(timeout=5)
    assert killed, "the worker never reached fold 2 epoch 2"
    assert result.per_fold[1].resumed_from == []  # fold 1: a plain second run, reproducing the first
    assert comparable(result.per_fold[1]) == comparable(uninterrupted.per_fold[1])
    assert result.per_fold[2].resumed_from == [1]  # continued after epoch 1's checkpoint, not from scratch
    assert comparable(result.per_fold[2]) == comparable(uninterrupted.per_fold[2])  # and ended as uninterrupted

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("ray-tests").experiment_id
    folds = client.search_runs([exp], filter_string="tags.`ser.train_run` = 'killed' and tags.`ser.role` = 'fold'")
    assert sorted(r.data.tags["ser.fold"] for r in folds) == ["1", "2"]  # one run per fold, not a duplicate
    [fold2] = [r for r in folds if r.data.tags["ser.fold"] == "2"]
    assert fold2.info.status == "FINISHED" and fold2.data.tags["ser.resumed_from_epochs"] == "1"


def test_two_workers_ddp_one_trainer_per_fold(ray_cluster, dataset, mlflow_uri, workdir):
    config = config_for(dataset, mlflow_uri, **{"train.num_workers": 2, "train.trainer_scope": "fold"})
    result = train_folds(config, run_name="two-workers", storage_path=str(workdir / "storage"))
    assert sorted(result.per_fold) == [1, 2]
    for r in result.per_fold.values():
        assert r.epochs_run == 2 and r.num_test == session_rows(dataset, r.fold)
        # Each of the 2 workers trains on an equal half of the fold's training rows (Ray's equal split drops
        # an odd row), so the ranks take equal numbers of DDP steps.
        speakers = pq.read_table(dataset, columns=["speaker"]).column("speaker").to_pylist()
        train_rows = sum(s in fold_spec(r.fold).train_speakers for s in speakers)
        assert all(h["train_samples"] == train_rows - train_rows % 2 for h in r.history)
    # One Ray Train run per fold under the storage path.
    assert (workdir / "storage" / "two-workers" / "fold=1").is_dir()
    assert (workdir / "storage" / "two-workers" / "fold=2").is_dir()


# --- stops before training ----------------------------------------------------------------------------------

def test_a_leaky_fold_stops_before_any_trainer_starts(ray_cluster, dataset, mlflow_uri, workdir, monkeypatch):
    def leaky(fold, protocol="loso5"):
        spec = fold_spec(fold, protocol)  # Ses01F both tested on and trained on
        return FoldSpec(spec.protocol, spec.fold, spec.test_sessions, spec.test_speakers, spec.val_speakers,
                        spec.train_speakers | {"Ses01F"})

    monkeypatch.setattr(folds_module, "fold_spec", leaky)
    config = config_for(dataset, mlflow_uri, **{"data.folds": (1,)})
    with pytest.raises(FoldLeakageError, match="Ses01F"):
        train_folds(config, run_name="leaky", storage_path=str(workdir / "storage"))
    assert not (workdir / "storage" / "leaky").exists()  # no Ray Train run was started
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("ray-tests").experiment_id
    [run] = client.search_runs([exp], filter_string="tags.`ser.train_run` = 'leaky'")
    assert run.info.status == "FAILED"


def test_an_unreachable_tracking_server_stops_the_run_at_start(ray_cluster, dataset, workdir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = config_for(dataset, f"http://127.0.0.1:{port}")
    with pytest.raises(tracking.TrackingError, match=str(port)):
        train_folds(config, run_name="no-server", storage_path=str(workdir / "storage"))
    assert not (workdir / "storage" / "no-server").exists()
