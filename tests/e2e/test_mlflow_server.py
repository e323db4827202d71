"""ser_platform.tracking.check_tracking_server against a real `mlflow server` (moved here from
tests/unit/test_cluster_paths.py, which keeps the checks that need no server)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ser_platform.tracking import TrackingError, check_tracking_server
from ser_platform.tracking import tracking_uri

from support import MlflowServer, free_ports


@pytest.fixture(scope="module")
def mlflow_server():
    """A real `mlflow server` on a free loopback port, its store the default URI of a fresh working directory."""
    workdir = Path(tempfile.mkdtemp(prefix="ser-mlflow-"))
    cwd, saved = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        os.chdir(workdir)
        backend = tracking_uri(None)
    finally:
        os.chdir(cwd)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    server = MlflowServer(backend, workdir, artifacts=workdir / "artifacts")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_live_mlflow_server_passes(mlflow_server):
    check_tracking_server(mlflow_server)
    check_tracking_server(mlflow_server + "/")



def test_live_mlflow_server_on_the_wrong_port_is_reported(mlflow_server):
    wrong = mlflow_server.rsplit(":", 1)[0] + f":{free_ports(1)[0]}"
    with pytest.raises(TrackingError) as err:
        check_tracking_server(wrong)
    assert wrong in str(err.value)
