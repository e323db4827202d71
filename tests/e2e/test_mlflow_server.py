"""ser_platform.tracking.check_tracking_server against a real `mlflow server` (moved here from
tests/unit/test_cluster_paths.py, which keeps the checks that need no server)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from ser_platform.tracking import TrackingError, check_tracking_server
from ser_platform.tracking import tracking_uri

from support import free_ports, group_members


@pytest.fixture(scope="module")
def mlflow_server():
    """A real `mlflow server` on a free loopback port, its store the default URI of a fresh working directory.

    Started in its own session, so the whole process group (uvicorn workers, MLflow's job consumers) is
    stopped at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="ser-mlflow-"))
    cwd, saved = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        os.chdir(workdir)
        backend = tracking_uri(None)
    finally:
        os.chdir(cwd)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    port = free_ports(1)[0]
    log = open(workdir / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend, "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as response:
                    if response.read() == b"OK":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(workdir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in group_members(process.pid):
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)



def test_live_mlflow_server_passes(mlflow_server):
    check_tracking_server(mlflow_server)
    check_tracking_server(mlflow_server + "/")



def test_live_mlflow_server_on_the_wrong_port_is_reported(mlflow_server):
    wrong = mlflow_server.rsplit(":", 1)[0] + f":{free_ports(1)[0]}"
    with pytest.raises(TrackingError) as err:
        check_tracking_server(wrong)
    assert wrong in str(err.value)
