"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check at tiny size on the CPU (flex_attention skipped,
as it has no backward there), Ray Train on the session's Ray instance; the markdown block it ends with."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import REPO


@pytest.mark.slow
def test_dry_run_runs_every_step_and_prints_the_block(ray_cluster, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, RAY_ADDRESS=ray_cluster, GPU_CHECK_OUT=str(tmp_path),
               PYTHONPATH=str(REPO))
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    status = {line.split("\t")[0]: line.split("\t")[1:] for line in (tmp_path / "status").read_text().splitlines()}
    steps = ["versions", "ray-train", "throughput", "peak-memory", "predicted", "attention-sdpa", "cache"]
    failed = {name: (tmp_path / f"{name}.log").read_text()[-2000:] for name in steps if status[name][0] != "0"}
    assert failed == {}
    assert status["attention-flex"] == ["-", "0", "skipped: flex_attention has no backward on the CPU"]
    block = run.stdout
    assert block.startswith("### GPU check (`bash benchmarks/gpu_check.sh` --dry-run)")
    assert '"backend": "gloo"' in block and '"all_reduce": 2.0' in block  # one worker: the sum is its own value
    assert "throughput:" in block and "utterances/s" in block
    assert "predicted peak" in block and "no CUDA peak measured" in block
    assert "done in" in block  # ser cache finished
    for name in steps:
        assert f"| {name} | 0 | " in block
