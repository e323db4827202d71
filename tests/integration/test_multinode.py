"""The platform on a Ray cluster of several nodes that share no disk, with data and results in object storage.

One cluster for the module (``support.LocalCluster``): a head with no CPU for work (so no Train worker lands on
it) and two worker nodes of 1 CPU each, the issue's topology; an S3-compatible server on 127.0.0.1 (moto) holds
the dataset, Ray's run storage and checkpoints, and an `mlflow server` (artifacts proxied to the same bucket)
holds the runs. Every command runs as a user runs it: `ser ...` in a subprocess whose working directory is an
empty folder, joined to the cluster through RAY_ADDRESS. Checked:

* a local dataset, storage or MLflow file store is refused at start, naming what to use instead, and nothing is
  written (issue 16 item 4);
* a trial's (fold, seed) units run at once: its fold runs overlap in time (MLflow start/end), each fold run is
  in MLflow once, the checkpoints are in the bucket and the working directory stays empty (items 2, 4, 5);
* two concurrent trials that take every CPU of the cluster ("auto" CPUs) complete (item 3; the issue's hang);
* a worker node lost while a fold trains: the unit restarts from its last checkpoint on the remaining node and
  the run completes, one MLflow run per fold, no gap in its epochs (item 7). Last: the cluster loses a node.

Minutes on 2 cores: tiny model, 1-2 epochs, 2 folds. Every process is stopped at the end (the fixtures).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ser_platform.data.parquet import prepare_dataset
from ser_platform.tracking import schema
from support import REPO, TINY_SIZES, LocalCluster, MlflowServer, MotoS3, node_holding, short_tempdir

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.cluster]  # the cluster tier: pytest --cluster

BUCKET = "ser-cluster"
SETS = {**TINY_SIZES, "train.batch_size": 8, "train.samples_per_class": 2, "data.max_audio_seconds": 1.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory, training_dataset):
    """The S3 server (dataset uploaded with `ser prepare --out s3://`), the MLflow server and the cluster."""
    # Short, outside pytest's folder: Ray's socket paths under it must fit in 107 bytes.
    with short_tempdir("ser-mn-") as root:  # short: Ray's socket paths must fit, removed after
        with MotoS3(root / "s3") as s3:
            saved = {k: os.environ.get(k) for k in s3.env}
            os.environ.update(s3.env)
            try:
                s3.create_bucket(BUCKET)
                corpus = Path(training_dataset).parent / "IEMOCAP_full_release"
                prepare_dataset(corpus, f"s3://{BUCKET}/iemocap.parquet")
                with MlflowServer(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", root / "mlflow",
                                  artifacts=f"s3://{BUCKET}/mlflow", env={**os.environ, **s3.env}) as mlflow, \
                        LocalCluster(root / "cluster", head_cpus=0, worker_cpus=(1, 1), env=s3.env) as cluster:
                    yield {"s3": s3, "mlflow": mlflow, "cluster": cluster, "root": root,
                           "dataset": f"s3://{BUCKET}/iemocap.parquet"}
            finally:
                for key, value in saved.items():
                    os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def ser(world: dict, workdir: Path, *args: str, script: str | None = None, timeout: float = 600,
        **env: str) -> subprocess.CompletedProcess:
    """A command of the project run as a user runs it on the cluster, in ``workdir`` (created empty)."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / script)] if script else [sys.executable, "-m", "ser_platform.cli"]
    return subprocess.run(command + list(args), cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env={**world["cluster"].env, **world["s3"].env, "RAY_ADDRESS": world["cluster"].address,
                               **env})


def remote_args(world: dict, storage: str, experiment: str) -> list[str]:
    sets = [arg for key, value in SETS.items() for arg in ("--set", f"{key}={value}")]
    return ["--dataset", world["dataset"], "--storage", f"s3://{BUCKET}/{storage}", "--mlflow-uri",
            world["mlflow"].uri, "--mlflow-experiment", experiment, "--folds", "1,2", *sets]


def fold_runs(world: dict, experiment: str) -> list:
    client = MlflowClient(world["mlflow"].uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], f"tags.`{schema.ROLE_TAG}` = '{schema.ROLE_FOLD}'")


def written(workdir: Path) -> list[str]:
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))


def test_local_paths_are_refused_before_anything_is_written(world):
    workdir = world["root"] / "refused"
    run = ser(world, workdir, "train", "--folds", "1", "--epochs", "1")  # the demo dataset, ./runs, ./mlflow.db
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    message = run.stderr.strip().splitlines()[-1]
    for named in ("data.dataset=(the embedded demo dataset", "tracking.storage=runs", "tracking.mlflow_uri=sqlite"):
        assert named in message
    assert "s3://" in message and "http(s)://" in message and "--shared-filesystem" in message
    assert "3 x" not in message and "{CPU: 1}" in message  # the cluster as Ray reports it: 2 worker nodes
    assert written(workdir) == []
    mixed = ser(world, workdir, "train", *remote_args(world, "refused", "refused")[:2], "--storage",
                str(workdir / "runs"), "--mlflow-uri", world["mlflow"].uri)
    assert mixed.returncode == 2 and f"tracking.storage={workdir / 'runs'}" in mixed.stderr
    assert written(workdir) == []


def test_a_trials_fold_units_run_at_once_on_two_nodes(world):
    workdir = world["root"] / "parallel"
    started = time.monotonic()
    # Five epochs (~13 s a fold here): with one, a fold ran ~3 s, less than the two units' start-up skew (~4 s),
    # so the two ran at once but their fold runs did not overlap.
    run = ser(world, workdir, "--trials", "1", "--epochs", "5", "--name", "units",
              *remote_args(world, "parallel", "parallel"), script="experiments/sweep_loss_weights.py")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 of each configuration's 2 (fold, seed) unit(s) at once" in run.stdout
    runs = fold_runs(world, "parallel")
    assert sorted(int(r.data.tags[schema.FOLD_TAG]) for r in runs) == [1, 2]  # each fold once
    (a, b) = [(r.info.start_time, r.info.end_time) for r in runs]
    assert max(a[0], b[0]) < min(a[1], b[1]), (a, b)  # the two fold runs overlap in time
    keys = world["s3"].objects(BUCKET, "parallel/")
    assert sum(k.endswith("/state.pt") for k in keys) == 2  # each unit's last checkpoint, in the bucket
    assert any("/fold=1/" in k for k in keys) and any("/fold=2/" in k for k in keys)
    artifacts = world["s3"].objects(BUCKET, "mlflow/")
    for artifact in (f"{schema.CONFUSION_ARTIFACT}.png", "model/"):  # MLflow's artifacts went to the bucket
        assert sum(artifact in k for k in artifacts) >= 2, sorted(artifacts)
    assert written(workdir) == []
    print(f"sweep of one trial, 2 units at once: {time.monotonic() - started:.0f} s")


def test_concurrent_trials_that_take_every_cpu_complete(world):
    workdir = world["root"] / "full"
    run = ser(world, workdir, "--trials", "2", "--max-concurrent", "2", "--epochs", "1", "--name", "full",
              *remote_args(world, "full", "full"), script="experiments/sweep_loss_weights.py")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 trial(s) at once (asked 2" in run.stdout and "1 CPU per worker (auto" in run.stdout
    runs = fold_runs(world, "full")
    assert len(runs) == 4 and len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 2
    assert written(workdir) == []


def test_a_node_lost_mid_fold_restarts_the_unit_from_its_checkpoint(world):
    workdir = world["root"] / "lost"
    workdir.mkdir()
    pid_file = world["root"] / "fault.pid"
    cluster = world["cluster"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "ser_platform.cli", "train", "--epochs", "2", *remote_args(world, "lost", "lost")],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**cluster.env, **world["s3"].env, "RAY_ADDRESS": cluster.address,
                        "SER_TEST_KILL_WORKER": f"1:2:{pid_file}"})
    try:
        deadline = time.monotonic() + 400
        while not pid_file.exists():
            assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()[-3000:]
            time.sleep(0.5)
        lost = node_holding(cluster, int(pid_file.read_text()))
        cluster.stop_worker(lost)  # the raylet and everything it started, no draining
        output, _ = driver.communicate(timeout=500)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-3000:]
    runs = {int(r.data.tags[schema.FOLD_TAG]): r for r in fold_runs(world, "lost")}
    assert sorted(runs) == [1, 2]  # one run per fold: the restarted unit found its own again
    assert runs[1].data.tags.get(schema.RESUMED_FROM_TAG) == "1"  # continued from epoch 1's checkpoint
    history = MlflowClient(world["mlflow"].uri).get_metric_history(runs[1].info.run_id, "val_ua")
    assert sorted({m.step for m in history}) == [1, 2]  # epoch 2 redone, none missing
    assert len(cluster.nodes()) == 2  # the head and the node that remained
