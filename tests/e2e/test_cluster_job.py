"""`ray job submit` of the embedded default (small budget) to a cluster of several nodes that share no disk, as on
a cloud (issue 16 items 5 and 6): token authentication on; a head with no CPU for work and two 1-CPU worker nodes
(``support.LocalCluster``); the dataset, Ray's run storage and checkpoints in an S3-compatible server on
127.0.0.1 (moto), every node reaching it through ``AWS_ENDPOINT_URL`` as a cloud node reaches S3; MLflow through
an `mlflow server` over HTTP whose artifacts go to the same bucket.

Checked: the job SUCCEEDS; every fold run is in MLflow exactly once; the checkpoints and MLflow's artifacts are
in the bucket; nothing was written to the job's working directory on the head but Python's bytecode caches, and
no dataset, checkpoint or MLflow store on any node's disk; `ser predict --run` loads a fold's weights back
through the tracking server from the bucket."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ser_platform.data.parquet import prepare_dataset
from ser_platform.tracking import schema
from support import RAY_CLI, REPO, TINY_SIZES, LocalCluster, MlflowServer, MotoS3, short_tempdir

# Heads and worker nodes of its own (tests/conftest.py sets e2e and slow); the cluster tier: pytest --cluster.
pytestmark = [pytest.mark.ray, pytest.mark.cluster]

BUCKET = "ser-job"
SUBMISSION_ID = "ser-cluster-job"
TRIALS, FOLDS = 2, (1, 2)
SETS = {**TINY_SIZES, "train.batch_size": 8, "train.samples_per_class": 2, "data.max_audio_seconds": 1.0}


@pytest.fixture(scope="module")
def job(training_dataset):
    with short_tempdir("ser-job-") as root:  # short: Ray's socket paths must fit, removed after
        token = secrets.token_hex(32)
        with MotoS3(root / "s3") as s3:
            s3.create_bucket(BUCKET)
            saved = {k: os.environ.get(k) for k in s3.env}
            os.environ.update(s3.env)
            try:
                corpus = Path(training_dataset).parent / "IEMOCAP_full_release"
                prepare_dataset(corpus, f"s3://{BUCKET}/iemocap.parquet")
            finally:
                for key, value in saved.items():
                    os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
            auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
            with MlflowServer(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", root / "mlflow",
                              artifacts=f"s3://{BUCKET}/mlflow", env={**os.environ, **s3.env}) as mlflow, \
                    LocalCluster(root / "cluster", worker_cpus=(1, 1), env={**s3.env, **auth}) as cluster:
                sets = [arg for key, value in SETS.items() for arg in ("--set", f"{key}={value}")]
                entrypoint = ["python", "experiments/sweep_loss_weights.py", "--trials", str(TRIALS), "--folds",
                              ",".join(map(str, FOLDS)), "--epochs", "1", "--dataset", f"s3://{BUCKET}/iemocap.parquet",
                              "--storage", f"s3://{BUCKET}/runs", "--mlflow-uri", mlflow.uri, "--name", "job",
                              "--debug", *sets]
                started = time.monotonic()
                submit = subprocess.run(RAY_CLI + ["job", "submit", f"--address={cluster.dashboard}",
                                                   f"--submission-id={SUBMISSION_ID}", f"--working-dir={REPO}", "--",
                                                   *entrypoint],
                                        env=cluster.env, cwd=root, capture_output=True, text=True, timeout=900)
                yield {"submit": submit, "seconds": time.monotonic() - started, "s3": s3, "mlflow": mlflow,
                       "cluster": cluster, "root": root, "corpus": corpus}


def test_the_job_succeeds_with_token_auth_on(job):
    submit = job["submit"]
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert f"Job '{SUBMISSION_ID}' succeeded" in submit.stdout + submit.stderr
    assert f"{TRIALS} of {TRIALS} trial(s) complete, 0 errored" in submit.stdout
    unauthenticated = subprocess.run(RAY_CLI + ["job", "list", f"--address={job['cluster'].dashboard}"],
                                     env={k: v for k, v in job["cluster"].env.items() if not k.startswith("RAY_AUTH")},
                                     capture_output=True, text=True, timeout=120)
    assert unauthenticated.returncode != 0
    print(f"ray job submit on 3 nodes: {job['seconds']:.0f} s")


def test_every_fold_run_is_in_mlflow_once_with_its_artifacts_in_the_bucket(job):
    client = MlflowClient(job["mlflow"].uri)
    experiment = client.get_experiment_by_name("ser_platform")
    folds = client.search_runs([experiment.experiment_id], f"tags.`{schema.ROLE_TAG}` = '{schema.ROLE_FOLD}'")
    pairs = sorted((f.data.tags[schema.TRIAL_ID_TAG], int(f.data.tags[schema.FOLD_TAG])) for f in folds)
    assert len(pairs) == TRIALS * len(FOLDS) == len(set(pairs))
    assert {fold for _, fold in pairs} == set(FOLDS)
    assert all(f.info.status == "FINISHED" for f in folds)
    artifacts = job["s3"].objects(BUCKET, "mlflow/")
    for fold in folds:
        for name in (f"{schema.CONFUSION_ARTIFACT}.png", "model/"):
            assert any(fold.info.run_id in k and name in k for k in artifacts), (fold.info.run_id, name)
    tables = [k for k in artifacts if "/tables/" in k]
    assert tables, sorted(artifacts)[:20]


def test_checkpoints_are_in_the_bucket_and_nothing_on_the_nodes_disks(job):
    keys = job["s3"].objects(BUCKET, "runs/")
    assert "runs/job/ser_sweep.json" in keys
    checkpoints = [k for k in keys if k.endswith("/state.pt")]
    assert len(checkpoints) >= TRIALS, sorted(keys)[:30]
    cluster_dir = job["cluster"].root
    local = [p for p in cluster_dir.rglob("*") if p.is_file() and (
        p.name in ("state.pt", "mlflow.db", "_common_metadata") or p.suffix == ".parquet")]
    assert local == []


def test_nothing_was_written_to_the_jobs_working_directory_but_logs(job):
    shipped = set(subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout.split())
    # session_2*: not session_latest, a link to the same folder
    packages = list((job["cluster"].root / "ray").glob("session_2*/runtime_resources/working_dir_files/*/"))
    assert len(packages) == 1, packages
    found = {str(p.relative_to(packages[0])) for p in packages[0].rglob("*") if p.is_file()}
    new = sorted(p for p in found - shipped if "__pycache__" not in p.split("/"))
    assert new == []
    assert not (job["cluster"].home / "ray_results").exists() or not any(
        p.suffix in (".pt", ".parquet") for p in (job["cluster"].home / "ray_results").rglob("*"))


def test_predict_loads_a_fold_model_from_the_bucket_through_the_tracking_server(job):
    client = MlflowClient(job["mlflow"].uri)
    experiment = client.get_experiment_by_name("ser_platform")
    fold = client.search_runs([experiment.experiment_id], f"tags.`{schema.ROLE_TAG}` = '{schema.ROLE_FOLD}'")[0]
    wav = next(job["corpus"].rglob("*.wav"))
    run = subprocess.run([sys.executable, "-m", "ser_platform.cli", "predict", "--run", fold.info.run_id, "--wav",
                          str(wav), "--text", "i am fine", "--mlflow-uri", job["mlflow"].uri, "--json"],
                         env={k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["run_id"] == fold.info.run_id
    probabilities = result["predictions"][0]["probabilities"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
