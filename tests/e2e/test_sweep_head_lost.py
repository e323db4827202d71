"""The head is lost mid-sweep and comes back (issue 17 item 2): the sweep's driver, its MLflow server and the
database behind MLflow and Optuna all stop at once, while a trial is training; they start again (the database
from its data folder, which lives outside the container on a cluster, cluster/postgres.sh) and `--resume --name`
continues: no finished trial is redone, the same parent run, the Optuna study continues where it was (its trial
numbers and history intact), no duplicate fold runs.

Real parts: Debian's PostgreSQL 15 through cluster/postgres.sh, an `mlflow server` on it, the sweep's driver in a
subprocess on a local Ray of its own; the trials are ``support.standin_train_folds`` (Tune's and MLflow's
bookkeeping without training).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ser_platform.config import load_config
from support import (REPO, SWEEP_BLOCK_ENV, SWEEP_CALLS_ENV, MlflowServer, clean_env, free_ports,
                     processes_mentioning, sweep_driver, tune_trials)

pytestmark = pytest.mark.skipif(shutil.which("initdb") is None and not list(Path("/usr/lib/postgresql").glob("*/bin")),
                                reason="PostgreSQL's server (initdb, pg_ctl) is not installed here")


def postgres(command: str, env: dict) -> None:
    done = subprocess.run(["bash", str(REPO / "cluster" / "postgres.sh"), command], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, f"postgres.sh {command}: {done.stderr[-2000:]}"


def kill_driver(driver: subprocess.Popen, ray_tmp: Path) -> None:
    """SIGKILL, as a lost machine: the driver and the local Ray it started (its processes name its temp dir)."""
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    for pid in processes_mentioning(str(ray_tmp)):
        try:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        except OSError:
            pass


def runs(client, experiment: str, role: str, parent: str | None = None) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    query = f"tags.`ser.role` = '{role}'" + (f" and tags.`mlflow.parentRunId` = '{parent}'" if parent else "")
    return client.search_runs([experiment_id], query, max_results=1000)


def test_a_sweep_resumes_after_its_driver_tracking_server_and_database_were_lost(training_dataset, monkeypatch):
    import optuna
    from mlflow import MlflowClient

    root = Path(tempfile.mkdtemp(prefix="ser-head-"))  # short: Ray's socket paths must fit in 107 bytes
    root.chmod(0o755)  # PostgreSQL runs as the postgres user when the tests run as root
    db_home, ray_tmp = root / "db", root / "ray"
    db_home.mkdir(mode=0o755)
    db_home.chmod(0o755)
    pg_port, = free_ports(1)
    db_env = clean_env(root / "home", PYTHONPATH=str(REPO), SER_DB_HOME=str(db_home), SER_DB_PORT=str(pg_port),
                       SER_DB_BACKUP=str(root / "bucket"), SER_DB_BACKUP_EVERY="3600")
    server = None
    try:
        postgres("start", db_env)
        pgpass = str(db_home / "pgpass")
        monkeypatch.setenv("PGPASSFILE", pgpass)  # how libpq finds the password here too (Optuna's read-back)
        backend, optuna_uri = ((db_home / n).read_text().strip() for n in ("mlflow_uri", "optuna_uri"))
        server = MlflowServer(backend, root / "mlflow", artifacts=root / "artifacts", env={**db_env, "PGPASSFILE": pgpass})
        server.start()
        config = load_config("demo", overrides={
            "data.dataset": training_dataset, "data.folds": (1, 2), "tracking.mlflow_uri": server.uri,
            "tracking.storage": str(root / "runs"), "tracking.experiment": "head-lost",
            "tracking.optuna_storage": optuna_uri, "sweep.trials": 3, "sweep.seed": 3,
            "sweep.max_concurrent": 1})  # one at a time: the kill finds one trial finished and one running
        config_file = root / "config.json"
        config_file.write_text(json.dumps(config.to_dict()))
        calls = root / "calls.txt"
        env = {**db_env, "PGPASSFILE": pgpass, SWEEP_CALLS_ENV: str(calls), "TUNE_GLOBAL_CHECKPOINT_S": "1",
               "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmp)}

        first = sweep_driver(root, config_file, name="head", resume=False, env={**env, SWEEP_BLOCK_ENV: "1"})
        deadline = time.monotonic() + 300
        while sorted(tune_trials(root / "runs" / "head").values()) != ["RUNNING", "TERMINATED"] or \
                len(set(calls.read_text().split() if calls.exists() else [])) < 2:
            assert first.poll() is None, f"the sweep ended early:\n{first.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no trial finished: {tune_trials(root / 'runs' / 'head')}"
            time.sleep(0.5)

        # The head is lost: its driver (and Ray), the tracking server and the database, all at once.
        kill_driver(first, ray_tmp)
        server.stop()
        postgres("stop", db_env)
        finished = calls.read_text().split()

        # A new head: the database from its data folder, the server on it, then --resume.
        postgres("start", db_env)
        server.start()
        second = sweep_driver(root, config_file, name="head", resume=True, env=env)
        output, _ = second.communicate(timeout=480)
        assert second.returncode == 0, output[-4000:]
        result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
        assert result["status"] == "FINISHED" and len(result["trials"]) == 3

        seen = calls.read_text().split()
        assert len(set(seen)) == 3 and len(seen) == 4, seen  # the two first attempts, then the third trial
        assert [t for t in set(finished) if seen.count(t) == 1] == [t for t in set(finished) if t != finished[-1]]
        client = MlflowClient(server.uri)
        [parent] = runs(client, "head-lost", "sweep")
        assert parent.info.run_id == result["parent"] and parent.info.status == "FINISHED"
        trials = runs(client, "head-lost", "trial", parent.info.run_id)
        assert len(trials) == 3 and {t.info.status for t in trials} == {"FINISHED"}
        for trial in trials:  # the restarted trial found its fold runs again: each trial has its 2 folds once
            assert len(runs(client, "head-lost", "fold", trial.info.run_id)) == 2
        study = optuna.load_study(study_name="head", storage=optuna_uri)
        assert [t.number for t in study.trials] == [0, 1, 2]
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    finally:
        for pid in processes_mentioning(str(ray_tmp)):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        if server is not None:
            server.stop()
        subprocess.run(["bash", str(REPO / "cluster" / "postgres.sh"), "stop"], env=db_env, capture_output=True,
                       timeout=180)
        shutil.rmtree(root, ignore_errors=True)
