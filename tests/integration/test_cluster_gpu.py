"""ser_platform.cluster.detect_gpu_count with Ray running (moved here from tests/unit/test_cluster_paths.py, which
keeps the count without Ray)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from support import REPO


@pytest.mark.ray
def test_gpu_count_with_ray_is_the_clusters(tmp_path):
    """A local Ray instance that declares 2 GPUs (none need exist): the count comes from Ray, not from CUDA.
    In a subprocess with its own temp dir and HOME, so no other Ray instance or ~/.ray/auth_token is touched; not
    the session's shared instance (tests/integration/conftest.py), which declares no GPUs."""
    temp_dir = tempfile.mkdtemp(prefix="ser-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    script = (
        "import ray, torch\n"
        "from ser_platform.cluster import detect_gpu_count\n"
        f"ray.init(address='local', num_cpus=1, num_gpus=2, include_dashboard=False, _temp_dir={temp_dir!r})\n"
        "try:\n"
        "    print('GPUS', detect_gpu_count(), torch.cuda.device_count())\n"
        "finally:\n"
        "    ray.shutdown()\n"
    )
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    try:
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("GPUS"))
    assert int(line.split()[1]) == 2
