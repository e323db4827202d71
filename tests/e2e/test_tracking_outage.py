"""The tracking server goes away mid-training (issue 17 item 3): nothing already logged is lost and the metrics
logged meanwhile arrive. MLflow's client retries a failed request with exponential backoff (7 retries, factor 2:
about four minutes in all, ``MLFLOW_HTTP_REQUEST_*``), so a worker logging an epoch while the server is away
waits and then logs it; a longer outage makes the logging call raise, the worker fail and Ray Train restart it
from its last checkpoint (``train.max_failures``), which finds its fold run again and logs the epochs it redoes.

`ser train` in a subprocess (its own local Ray), one fold of a tiny model. Once the first epoch's metrics are in,
the server stops and a stand-in takes its port that answers every request 503 (and counts them): the outage lasts
until the worker has tried to log there and at least 30 s (``OUTAGE_S``, issue 17's "~30 s") have passed, so it
is felt whatever the machine's speed; then the server starts again on the same port and store, and is read back
as it is. The client keeps MLflow's default backoff, as a user's workers do.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient

from support import REPO, TINY_SIZES, MlflowServer, clean_env

EPOCHS = 4
OUTAGE_S = 30
TINY = {**TINY_SIZES, "train.batch_size": 8, "train.samples_per_class": 2, "data.max_audio_seconds": 1.0}


def fold_runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], "tags.`ser.role` = 'fold'")


def wait_for_first_epoch(client: MlflowClient, train: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = fold_runs(client, "outage")
        if runs and client.get_metric_history(runs[0].info.run_id, "val_ua"):
            return
        assert train.poll() is None, f"ser train ended early:\n{train.stdout.read()[-3000:]}"
        time.sleep(0.5)
    pytest.fail("no epoch reached MLflow")


class Unavailable:
    """The server's port while it is away: every request gets 503 Service Unavailable (which MLflow's client
    retries), counted."""

    def __init__(self, port: int):
        self.requests: list[str] = []  # the first line of each request
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:  # the accept timed out: look at `stopped` again
                continue
            with connection:
                connection.settimeout(2)
                try:
                    head = connection.recv(65536)
                    connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                       b"Connection: close\r\n\r\n")
                except OSError:
                    head = b""
            self.requests.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.listener.close()


def test_metrics_logged_while_the_server_is_away_arrive_and_the_fold_finishes(training_dataset, tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "server", artifacts=tmp_path / "artifacts")
    client = MlflowClient(server.start())
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    try:  # the server is stopped at the end whatever fails
        train = subprocess.Popen(
            [sys.executable, "-m", "ser_platform.cli", "train", "--dataset", training_dataset, "--folds", "1",
             "--epochs", str(EPOCHS), "--mlflow-uri", server.uri, "--mlflow-experiment", "outage",
             "--storage", str(tmp_path / "runs"), *sets],
            cwd=tmp_path, env=clean_env(tmp_path / "home", PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_first_epoch(client, train)
            server.stop()
            away = time.time()
            stand_in = Unavailable(server.port)
            deadline = time.monotonic() + 300
            while (not stand_in.requests or time.time() - away < OUTAGE_S) and time.monotonic() < deadline:
                time.sleep(0.5)
            stand_in.close()
            refused = list(stand_in.requests)
            server.start()
            output, _ = train.communicate(timeout=420)
        finally:
            if train.poll() is None:
                train.kill()
                train.wait()
        # Read back from the server that came back.
        assert train.returncode == 0, output[-4000:]
        [fold] = fold_runs(client, "outage")  # one run for the fold: nothing duplicated
        assert fold.info.status == "FINISHED" and "test_ua" in fold.data.metrics
        history = client.get_metric_history(fold.info.run_id, "val_ua")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # every epoch, none lost
        # The worker tried to log while the server was away (the stand-in answered 503 to its log-batch call),
        # and what it logged then arrived (every epoch is there, once).
        assert any("/runs/log-batch" in line for line in refused), refused
    finally:
        server.stop()
