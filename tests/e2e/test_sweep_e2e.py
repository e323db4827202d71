"""The sweep as a user runs it on a cluster: `ray job submit` to a Ray head, MLflow read back two ways.

One module, one job (about two minutes on 2 cores):

1. a local head (`ray start --head --block`, its own ports, temp dir and HOME, 2 logical CPUs), started from this
   virtualenv so the job's `python` and every Ray worker are this interpreter;
2. `ray job submit --working-dir <repo root> -- python experiments/sweep_loss_weights.py --trials 2 --folds 1,2
   --epochs 1 ...` over a tiny synthetic Parquet dataset, a SQLite MLflow store and Tune storage outside the
   repo; the repo's .rayignore decides what travels (no venv, no data);
3. the run tree through ``MlflowClient``: one sweep parent run, its 2 trial runs, 2 fold runs under each with
   test WA/UA, and the trials' summary equal to the mean of their folds;
4. the same store served by `mlflow server` and read through its REST API (``POST /api/2.0/mlflow/runs/search``),
   as the MLflow UI reads it: the run count and the params the UI's columns show (``loss.alpha``, ``variant``,
   ``table``).

The head runs under `ray start --block`, whose SIGTERM handler stops every process it started; the finaliser
sends it, then kills anything left that names the head's temp dir (Linux /proc), as tests/e2e/test_cluster_auth.py
does.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from support import MlflowServer, REPO, RAY_CLI, TINY_SIZES, head_command, processes_mentioning
from support import clean_env as auth_clean_env

EXPERIMENT = "e2e"
SUBMISSION_ID = "ser-e2e-sweep"
FOLDS = (1, 2)
TRIALS = 2
# Tiny model (support.TINY_SIZES) and batches: the job's minutes go to Ray, not to torch.
TINY_SET = {
    **TINY_SIZES,
    "train.batch_size": 8, "train.samples_per_class": 2, "data.max_audio_seconds": 1.0,
}


# --- processes (tests/support.py's helpers) ---------------------------------------------------------------------

def clean_env(home: Path) -> dict:
    """support's clean environment (no Ray address/auth of the user, this venv first on PATH: the job's
    entrypoint `python` is looked up there), without MLflow settings, no drain wait on SIGTERM."""
    env = auth_clean_env(home, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    return {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(url: str, process: subprocess.Popen, log: Path, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


# --- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def root():
    # Short and outside the repo: Ray's socket paths under it must fit in 107 bytes, and nothing may land in the
    # working dir the job ships.
    path = Path(tempfile.mkdtemp(prefix="ser-e2e-", dir="/tmp"))
    (path / "home").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head(root):
    # Its own head under `ray start --block`, not the integration tier's ray_cluster: jobs are submitted to it.
    command, dashboard = head_command(root / "ray", num_cpus=2)
    env = clean_env(root / "home")
    log_path = root / "head.log"
    log = open(log_path, "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for(url + "/api/jobs/", head, log_path, "Ray head")
        yield {"url": url, "env": env}
    finally:
        stop(head)
        for pid in processes_mentioning(str(root / "ray")):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


@pytest.fixture(scope="module")
def sweep_job(root, training_dataset, ray_head) -> dict:
    """`ray job submit` of the 2-trial sweep; blocks until the job ends. Its output and the places it wrote."""
    db = root / "mlflow" / "mlflow.db"
    storage = root / "runs"
    sets = [arg for key, value in TINY_SET.items() for arg in ("--set", f"{key}={value}")]
    entrypoint = ["python", "experiments/sweep_loss_weights.py", "--trials", str(TRIALS), "--dataset", training_dataset,
                  "--mlflow-uri", f"sqlite:///{db}", "--storage", str(storage), "--mlflow-experiment", EXPERIMENT,
                  "--folds", ",".join(map(str, FOLDS)), "--epochs", "1", "--name", "e2e-sweep", *sets]
    started = time.monotonic()
    submit = subprocess.run(
        RAY_CLI + ["job", "submit", f"--address={ray_head['url']}", f"--submission-id={SUBMISSION_ID}",
                   f"--working-dir={REPO}", "--", *entrypoint],
        env=ray_head["env"], cwd=root, capture_output=True, text=True, timeout=420)
    status = subprocess.run(
        RAY_CLI + ["job", "status", f"--address={ray_head['url']}", SUBMISSION_ID],
        env=ray_head["env"], cwd=root, capture_output=True, text=True, timeout=60)
    return {"submit": submit, "status": status, "seconds": time.monotonic() - started, "url": ray_head["url"],
            "uri": f"sqlite:///{db}", "db": db, "storage": storage}


@pytest.fixture(scope="module")
def client(sweep_job):
    from mlflow import MlflowClient

    assert sweep_job["submit"].returncode == 0, "job failed; see test_job_succeeded"
    return MlflowClient(tracking_uri=sweep_job["uri"])


@pytest.fixture(scope="module")
def experiment_id(client) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, [e.name for e in client.search_experiments()]
    return experiment.experiment_id


@pytest.fixture(scope="module")
def mlflow_server(root, sweep_job):
    server = MlflowServer(sweep_job["uri"], root, env=clean_env(root / "home"))
    try:
        yield server.start()
    finally:
        server.stop()


# --- tests -------------------------------------------------------------------------------------------------------

def test_job_runs_the_shipped_code_in_this_environment(root, ray_head):
    """The job's `python` is this virtualenv's; `ser_platform` is imported from the uploaded working dir (Ray
    puts it first on the job's PYTHONPATH), not from the checkout this test runs from."""
    probe = ("import sys, ser_platform; print('PREFIX', sys.prefix); print('PACKAGE', ser_platform.__file__)")
    run = subprocess.run(RAY_CLI + ["job", "submit", f"--address={ray_head['url']}", f"--working-dir={REPO}",
                                    "--", "python", "-c", probe],
                         env=ray_head["env"], cwd=root, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("PREFIX ", "PACKAGE ")))
    assert lines["PREFIX"] == sys.prefix
    package = Path(lines["PACKAGE"])
    assert package.name == "__init__.py" and package.parent.name == "ser_platform"
    assert package.is_relative_to(root / "ray") and not package.is_relative_to(REPO), package


def test_job_succeeded(sweep_job):
    submit, status = sweep_job["submit"], sweep_job["status"]
    output = submit.stdout[-4000:] + submit.stderr[-4000:]
    assert submit.returncode == 0, output
    assert f"Job '{SUBMISSION_ID}' succeeded" in submit.stdout + submit.stderr, output
    assert status.returncode == 0 and f"Job '{SUBMISSION_ID}' succeeded" in status.stdout, status.stdout
    with urllib.request.urlopen(f"{sweep_job['url']}/api/jobs/{SUBMISSION_ID}", timeout=10) as response:
        job = json.loads(response.read())
    assert job["status"] == "SUCCEEDED" and job["entrypoint"].startswith("python experiments/sweep_loss_weights.py")
    # The sweep's own summary line, printed by the job's driver and streamed back by `ray job submit`.
    assert f"{TRIALS} of {TRIALS} trial(s) complete, 0 errored" in submit.stdout, output
    # A readable console: the project's lines per epoch, fold and trial; Ray's and Tune's own lines in their logs.
    for fold in FOLDS:
        assert re.search(rf"^trial \S+ \| fold {fold}: training, 1 epoch\(s\)$", submit.stdout, re.M), output
        assert re.search(rf"^trial \S+ \| fold {fold} epoch 1/1 \| train loss", submit.stdout, re.M), output
    # Each trial says it started before Ray Train's start-up, so the console is never silent for long.
    assert len(re.findall(rf"^trial \S+ \| started \(.*loss\.alpha=.*\), {len(FOLDS)} fold\(s\) to train$",
                          submit.stdout, re.M)) == TRIALS, output
    assert len(re.findall(r"^trial \d/\d done: ", submit.stdout, re.M)) == TRIALS, output
    for noise in ("SplitCoordinator", "PreemptionWatcher", "TensorBoard", "Trial status:", "execution finished"):
        assert noise not in submit.stdout + submit.stderr, noise
    assert re.search(r"^Ray's own output of this run: \S+/logs$", submit.stdout, re.M), output
    print(f"ray job submit: {sweep_job['seconds']:.0f} s")


def test_mlflow_holds_sweep_trials_and_folds(client, experiment_id, sweep_job):
    parents = client.search_runs([experiment_id], "tags.`ser.role` = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == TRIALS
    trials = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == TRIALS
    assert {t.data.tags["ser.role"] for t in trials} == {"trial"}
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert trial.data.params["table"] == "2" and trial.data.params["variant"] == "search"
        assert trial.data.params["data.folds"] == ",".join(map(str, FOLDS))
        assert 0.0 <= float(trial.data.params["loss.alpha"]) <= 1.0
        folds = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
        assert sorted(int(f.data.tags["ser.fold"]) for f in folds) == list(FOLDS)
        for fold in folds:
            assert fold.info.status == "FINISHED" and fold.data.tags["ser.role"] == "fold"
            assert 0.0 <= fold.data.metrics["test_ua"] <= 1.0 and 0.0 <= fold.data.metrics["test_wa"] <= 1.0
            assert fold.data.params["loss.alpha"] == trial.data.params["loss.alpha"]
            # The epoch's timings nest: optimizer steps within the training pass within the epoch.
            times = fold.data.metrics
            assert 0.0 < times["train_step_time_s"] <= times["train_time_s"] <= times["epoch_time_s"]
        # The trial's summary is its folds' mean, computed here from the fold runs themselves.
        assert trial.data.metrics["folds_completed"] == len(FOLDS)
        assert trial.data.metrics["test_ua_mean"] == pytest.approx(
            np.mean([f.data.metrics["test_ua"] for f in folds]))
    # Nothing else in the experiment: 1 parent + 2 trials + 2 x 2 folds.
    assert len(client.search_runs([experiment_id], "", max_results=100)) == 1 + TRIALS + TRIALS * len(FOLDS)
    # The trials differ: Optuna proposed two configurations.
    assert len({(t.data.params["loss.alpha"], t.data.params["loss.beta"]) for t in trials}) == TRIALS
    assert (sweep_job["storage"] / "e2e-sweep" / "ser_sweep.json").exists()


def test_mlflow_server_rest_api_serves_the_runs(mlflow_server, client, experiment_id):
    url = mlflow_server + "/api/2.0/mlflow/runs/search"
    every = post_json(url, {"experiment_ids": [experiment_id], "max_results": 100})
    assert len(every["runs"]) == 1 + TRIALS + TRIALS * len(FOLDS)
    trials = post_json(url, {"experiment_ids": [experiment_id], "filter": "tags.`ser.role` = 'trial'",
                             "max_results": 100})["runs"]
    assert len(trials) == TRIALS
    by_id = {r.info.run_id: r for r in client.search_runs([experiment_id], "tags.`ser.role` = 'trial'")}
    for run in trials:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert params["table"] == "2" and params["variant"] == "search"
        expected = by_id[run["info"]["run_id"]]  # the server reads what the client wrote
        assert params["loss.alpha"] == expected.data.params["loss.alpha"]
        assert params["loss.beta"] == expected.data.params["loss.beta"]
        assert metrics["test_ua_mean"] == pytest.approx(expected.data.metrics["test_ua_mean"])
    # The filter the UI's search box takes for Table 2.
    table2 = post_json(url, {"experiment_ids": [experiment_id], "filter": "params.table = '2'",
                             "max_results": 100})["runs"]
    assert {r["info"]["run_id"] for r in table2} >= set(by_id)
