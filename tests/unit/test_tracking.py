"""ser_platform.tracking against a real MLflow store (SQLite in tmp_path), read back through MlflowClient."""

from __future__ import annotations

import json
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ser_platform import tracking
from ser_platform.tracking import schema
from ser_platform.config import from_dict, load_config


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def store(store_dir) -> str:
    """One SQLite store for the module (creating one costs seconds); tests use their own experiments."""
    return tracking.ensure_store(f"sqlite:///{store_dir / 'db' / 'mlflow.db'}")


def test_uri_precedence_config_then_env_then_local_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config("demo")
    assert tracking.resolve_tracking_uri(config) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.resolve_tracking_uri(config) == "http://tracking.example:5000"
    config = config.replace({"tracking.mlflow_uri": "sqlite:///rel/runs.db"})
    # Relative SQLite paths become absolute: Ray workers run in other working directories.
    assert tracking.resolve_tracking_uri(config) == f"sqlite:///{tmp_path.resolve() / 'rel' / 'runs.db'}"


def test_ensure_store_creates_sqlite_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    assert tracking.ensure_store(uri) == uri
    assert (tmp_path / "new" / "mlflow.db").is_file()
    names = [e.name for e in MlflowClient(uri).search_experiments()]
    assert names == ["Default"]
    tracking.ensure_store(uri)  # a second call on an existing store is harmless


def test_a_new_sqlite_store_is_created_in_the_background_and_other_stores_when_waited_for(tmp_path, monkeypatch):
    import threading

    from ser_platform.tracking import store as store_module

    threads = []
    real = store_module.ensure_store
    monkeypatch.setattr(store_module, "ensure_store",
                        lambda uri, **kw: threads.append(threading.current_thread().name) or real(uri, **kw))
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    ready = tracking.ensure_store_started(uri)  # a new SQLite store: begun at once, in its own thread
    assert ready() == uri and [e.name for e in MlflowClient(uri).search_experiments()] == ["Default"]
    assert len(threads) == 1 and threads[0] != threading.current_thread().name
    ready = tracking.ensure_store_started(uri)  # it exists now: nothing begun until waited for
    assert len(threads) == 1
    assert ready() == uri and threads[-1] == threading.current_thread().name
    with socket.socket() as sock:  # a server nobody runs: the error comes when waited for, naming the URI
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ready = tracking.ensure_store_started(down)
    with pytest.raises(tracking.TrackingError, match=re.escape(down)):
        ready()


def test_unreachable_server_fails_at_start_naming_the_uri():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(tracking.TrackingError, match=re.escape(uri)):
        tracking.ensure_store(uri, timeout_s=2)


def test_experiment_is_created_once_with_artifacts_beside_the_db(store, store_dir):
    first = tracking.experiment_id(store, "once")
    assert tracking.experiment_id(store, "once") == first
    location = MlflowClient(store).get_experiment(first).artifact_location
    assert location == (store_dir / "db" / "mlruns").resolve().as_uri()


def test_runs_nest_and_carry_config_params_and_yaml(store):
    config = load_config("demo", overrides={"loss.alpha": 0.25, "data.folds": [1, 3]})
    exp = tracking.experiment_id(store, "nesting")
    parent = tracking.start_run(store, exp, run_name="parent", tags={"ser.role": "train"})
    child = tracking.start_run(store, exp, run_name="fold=1", parent_run_id=parent.run_id, tags={"ser.fold": 1})
    child.log_config(config, {"git_commit": "abc", "fold": 1})
    child.log_metrics({"val_ua": 0.5}, step=1)
    child.log_metrics({"val_ua": 0.75}, step=2)
    child.finish()

    client = MlflowClient(store)
    run = client.get_run(child.run_id)
    assert run.data.tags[schema.PARENT_RUN_TAG] == parent.run_id
    assert run.data.tags["ser.fold"] == "1"
    assert run.info.status == "FINISHED"
    flat = config.flat()
    assert len(run.data.params) == len(flat) + 2
    assert run.data.params["loss.alpha"] == "0.25"
    assert run.data.params["data.folds"] == "1,3"
    assert run.data.params["git_commit"] == "abc"
    history = client.get_metric_history(child.run_id, "val_ua")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    logged = yaml.safe_load(Path(client.download_artifacts(child.run_id, "config.yaml")).read_text())
    assert from_dict(logged) == config  # the YAML is the whole resolved config


def test_find_or_start_run_continues_the_same_run(store):
    tags = {"ser.role": "train", "ser.train_run": "train-1"}
    exp = tracking.experiment_id(store, "continue")
    first, created = tracking.find_or_start_run(store, exp, run_name="train-1", tags=tags)
    again, created_again = tracking.find_or_start_run(store, exp, run_name="train-1", tags=tags)
    other, _ = tracking.find_or_start_run(store, exp, run_name="train-2", tags={**tags, "ser.train_run": "train-2"})
    nested, _ = tracking.find_or_start_run(store, exp, run_name="train-1", tags=tags, parent_run_id=first.run_id)
    assert again == first and created and not created_again
    assert other != first and nested != first
    assert MlflowClient(store).get_run(nested.run_id).data.tags[schema.PARENT_RUN_TAG] == first.run_id


def test_confusion_is_logged_as_json_and_figure(store):
    run = tracking.start_run(store, tracking.experiment_id(store, "confusion"), run_name="r")
    matrix = [[3, 1, 0, 0], [0, 2, 0, 1], [0, 0, 4, 0], [1, 0, 0, 5]]
    tracking.log_confusion(run, matrix, ("angry", "happy", "neutral", "sad"))
    client = MlflowClient(store)
    names = sorted(a.path for a in client.list_artifacts(run.run_id))
    assert names == ["confusion_test.json", "confusion_test.png"]
    data = json.loads(Path(client.download_artifacts(run.run_id, "confusion_test.json")).read_text())
    assert data == {"classes": ["angry", "happy", "neutral", "sad"], "matrix": matrix}
    png = Path(client.download_artifacts(run.run_id, "confusion_test.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_dataset_fingerprint_follows_names_sizes_and_summary(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "part-00000.parquet").write_bytes(b"x" * 10)
    (ds / "part-00001.parquet").write_bytes(b"y" * 20)
    base = tracking.dataset_fingerprint(str(ds), {"utterances": 2})
    assert tracking.dataset_fingerprint(str(ds), {"utterances": 2}) == base
    copy = tmp_path / "copy"
    copy.mkdir()
    for part in ds.iterdir():
        (copy / part.name).write_bytes(part.read_bytes())
    assert tracking.dataset_fingerprint(str(copy), {"utterances": 2}) == base  # where it lives does not matter
    assert tracking.dataset_fingerprint(str(ds), {"utterances": 3}) != base
    (ds / "part-00001.parquet").write_bytes(b"y" * 21)
    assert tracking.dataset_fingerprint(str(ds), {"utterances": 2}) != base
    with pytest.raises(FileNotFoundError, match="missing"):
        tracking.dataset_fingerprint(str(tmp_path / "missing"))


def test_git_commit_is_the_checkout_head():
    repo = Path(tracking.__file__).resolve().parents[2]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    commit = tracking.git_commit(repo)
    assert commit.removesuffix("-dirty") == head.stdout.strip()
    assert tracking.git_commit("/") == "unknown"


def test_git_commit_outside_a_checkout_comes_from_the_job_env(monkeypatch, tmp_path):
    # `ray job submit --working-dir .` uploads no .git: the submitter passes the commit in SER_GIT_COMMIT.
    monkeypatch.setenv("SER_GIT_COMMIT", "0123abc")
    assert tracking.git_commit(tmp_path) == "0123abc"
    repo = Path(tracking.__file__).resolve().parents[2]
    assert tracking.git_commit(repo) != "0123abc"  # a real checkout wins
