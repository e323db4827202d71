"""cluster/mlflow_server.sh and cluster/postgres.sh as the head runs them (tests/unit/test_cluster_yaml.py keeps the
offline checks of the launcher configs): the server binds the private address only; with PostgreSQL behind it,
runs, metrics, artifacts and Optuna's study are read back, and again after the head is lost (server, database and
their folder gone) and restored from the bucket backup."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ser_platform.tracking import TrackingError, check_tracking_server

from support import REPO, free_ports, group_members

CLUSTER_DIR = REPO / "cluster"


def test_mlflow_server_script_binds_the_private_address(tmp_path):
    """cluster/mlflow_server.sh as the head runs it (local artifact folder, free port): it listens on this
    machine's private address only and leaves the URI that `ray start` exports. Linux (/proc)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    state = tmp_path / "mlflow"
    env = dict(os.environ, MLFLOW_SERVER_HOME=str(state), PYTHONPATH=str(REPO),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    try:
        run = subprocess.run(["bash", str(CLUSTER_DIR / "mlflow_server.sh"), str(tmp_path / "artifacts"), str(port)],
                             env=env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr + (state / "server.log").read_text()
        uri = (state / "tracking_uri").read_text().strip()
        host = uri.removeprefix("http://").rsplit(":", 1)[0]
        address = ipaddress.ip_address(host)
        assert address.is_private and not address.is_loopback and not address.is_unspecified
        check_tracking_server(uri)
        # Bound to that address only: not on every interface, so not on the loopback either.
        with pytest.raises(TrackingError, match="unreachable"):
            check_tracking_server(f"http://127.0.0.1:{port}", timeout=2)
    finally:
        pid_file = state / "server.pid"
        if pid_file.exists():
            stop_process_group(int(pid_file.read_text()))



def stop_process_group(pgid: int, timeout: float = 15) -> None:
    """SIGTERM a process group this test started (the script starts MLflow in its own session), then SIGKILL
    whatever is left of it."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.25)
    for pid in group_members(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def script_env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), **extra,
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def start_mlflow(state: Path, port: int, backend: str, pgpass: Path, artifacts: Path) -> str:
    run = subprocess.run(["bash", str(CLUSTER_DIR / "mlflow_server.sh"), str(artifacts), str(port)],
                         env=script_env(MLFLOW_SERVER_HOME=str(state), MLFLOW_BACKEND_STORE_URI=backend,
                                        PGPASSFILE=str(pgpass)),
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr + (state / "server.log").read_text()
    return (state / "tracking_uri").read_text().strip()


def postgres(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_DIR / "postgres.sh"), command], env=env, capture_output=True,
                          text=True, timeout=180)


def log_a_run(uri: str, artifact_dir: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("paper-sweep")
    run = client.create_run(experiment, run_name="trial=0/fold=1")
    client.log_param(run.info.run_id, "loss.alpha", "0.5")
    for epoch, ua in enumerate((0.41, 0.52, 0.58)):
        client.log_metric(run.info.run_id, "val_ua", ua, step=epoch)
    (artifact_dir / "confusion.txt").write_text("4x4 confusion matrix")
    client.log_artifact(run.info.run_id, str(artifact_dir / "confusion.txt"))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def read_back(uri: str, run_id: str, download_dir: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "val_ua")]
    path = client.download_artifacts(run_id, "confusion.txt", str(download_dir))
    return run.data.params, sorted(history), Path(path).read_text(), run.info.status


def optuna_trials(storage_uri: str, add: int = 0) -> list[tuple[int, float]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="paper-sweep", storage=storage_uri, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(add):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("alpha", 0.0, 1.0))
    return [(t.number, t.value) for t in study.trials]


@pytest.mark.skipif(shutil.which("initdb") is None or shutil.which("pg_ctl") is None,
                    reason="PostgreSQL's server (initdb, pg_ctl) is not installed here")
def test_postgres_backed_server_survives_a_lost_head(monkeypatch):
    """cluster/postgres.sh + cluster/mlflow_server.sh as the head starts them, on a loopback port: a run (param,
    metric history, artifact) and an Optuna study are read back; after a backup to the 'bucket' (a folder, through
    the same pyarrow code as s3://), the server, the database and the head's folder are destroyed; a new start
    restores them and the same run and study come back whole, the study then continues numbering."""
    root = Path(tempfile.mkdtemp(prefix="ser-pg-"))
    root.chmod(0o755)  # PostgreSQL runs as the postgres user when the tests run as root
    db_home, bucket, artifacts, downloads = (root / n for n in ("db", "bucket", "artifacts", "downloads"))
    for folder in (db_home, downloads):
        folder.mkdir()
    db_home.chmod(0o755)
    pg_port, mlflow_port = free_ports(2)
    env = script_env(SER_DB_HOME=str(db_home), SER_DB_PORT=str(pg_port), SER_DB_BACKUP=str(bucket),
                     SER_DB_BACKUP_EVERY="3600")
    mlflow_state = root / "mlflow"
    monkeypatch.setenv("PGPASSFILE", str(db_home / "pgpass"))  # how libpq (psycopg, for Optuna) finds the password
    try:
        started = postgres("start", env)
        assert started.returncode == 0, started.stderr
        backend, optuna_uri = ((db_home / n).read_text().strip() for n in ("mlflow_uri", "optuna_uri"))
        assert backend.startswith("postgresql://ser@127.0.0.1:") and urlsplit(backend).password is None
        uri = start_mlflow(mlflow_state, mlflow_port, backend, db_home / "pgpass", artifacts)
        run_id = log_a_run(uri, root)
        expected = ({"loss.alpha": "0.5"}, [(0, 0.41), (1, 0.52), (2, 0.58)], "4x4 confusion matrix", "FINISHED")
        assert read_back(uri, run_id, downloads / "first") == expected
        assert [n for n, _ in optuna_trials(optuna_uri, add=3)] == [0, 1, 2]
        backed_up = postgres("backup", env)
        assert backed_up.returncode == 0, backed_up.stderr
        assert (bucket / "latest" / "mlflow.dump").stat().st_size > 0

        # The head is lost: server and database stopped, their folder gone. Only the bucket remains.
        stop_process_group(int((mlflow_state / "server.pid").read_text()))
        assert postgres("stop", env).returncode == 0
        shutil.rmtree(db_home)
        shutil.rmtree(mlflow_state)
        db_home.mkdir()
        db_home.chmod(0o755)

        restarted = postgres("start", env)
        assert restarted.returncode == 0, restarted.stderr
        assert "restored mlflow optuna" in restarted.stdout
        uri = start_mlflow(mlflow_state, mlflow_port, (db_home / "mlflow_uri").read_text().strip(),
                           db_home / "pgpass", artifacts)
        assert read_back(uri, run_id, downloads / "second") == expected
        trials = optuna_trials(optuna_uri, add=1)
        assert [n for n, _ in trials] == [0, 1, 2, 3]
    finally:
        pid_file = mlflow_state / "server.pid"
        if pid_file.exists():
            stop_process_group(int(pid_file.read_text()))
        postgres("stop", env)
        shutil.rmtree(root, ignore_errors=True)
