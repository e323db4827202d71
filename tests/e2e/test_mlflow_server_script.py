"""cluster/mlflow_server.sh as the head runs it (moved here from tests/unit/test_cluster_yaml.py, which keeps the
offline checks of the launcher configs)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ser_platform.tracking import TrackingError, check_tracking_server

from support import REPO, group_members

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
