"""A sweep on a cluster that starts with no worker node and an autoscaler that starts them on demand (issue 16
item 1): the sweep asks for the trials the user wants, capped by the autoscaler's configured maximum (not by the
nodes up at submit time), says so, and the waiting trials make the autoscaler start two worker nodes.

The cluster is Ray's own local autoscaling set-up: a head started with `--autoscaling-config` (written where
`ray up` puts it, ~/ray_bootstrap_config.yaml of the cluster's HOME) naming Ray's fake multi-node provider,
which starts worker nodes as local processes when the autoscaler asks for them (``support.LocalCluster``,
``support.fake_autoscaler_config``). Its nodes run on this one machine, so the sweep is told the paths are shared
(--shared-filesystem); the refusal without it is tested in tests/integration/test_multinode.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient

from ser_platform.tracking import schema
from support import REPO, TINY_SIZES, LocalCluster, fake_autoscaler_config, short_tempdir

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.cluster]  # the cluster tier: pytest --cluster

SETS = {**TINY_SIZES, "train.batch_size": 8, "train.samples_per_class": 2, "data.max_audio_seconds": 1.0}


def test_two_concurrent_trials_make_the_autoscaler_start_two_worker_nodes(training_dataset):
    with short_tempdir("ser-as-") as root:  # short: Ray's socket paths must fit, removed after
        autoscaling = fake_autoscaler_config("cpu1", {"CPU": 1}, max_workers=2)
        with LocalCluster(root / "cluster", autoscaling=autoscaling) as cluster:
            assert len(cluster.nodes()) == 1  # the head alone, no CPU for work
            seen: list[int] = []
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    try:
                        seen.append(len(cluster.nodes()))
                    except OSError:
                        pass
                    time.sleep(1)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            uri = f"sqlite:///{root / 'mlflow.db'}"
            sets = [arg for key, value in SETS.items() for arg in ("--set", f"{key}={value}")]
            try:
                run = subprocess.run(
                    [sys.executable, str(REPO / "experiments" / "sweep_loss_weights.py"), "--trials", "2",
                     "--max-concurrent", "2", "--folds", "1", "--epochs", "1", "--dataset", training_dataset,
                     "--storage", str(root / "runs"), "--mlflow-uri", uri, "--mlflow-experiment", "autoscaling",
                     "--shared-filesystem", *sets],
                    cwd=root, env={**cluster.env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True,
                    timeout=900)
            finally:
                done.set()
                watcher.join()
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        decided = next(line for line in run.stdout.splitlines() if "trial(s) at once" in line)
        assert "2 trial(s) at once (asked 2" in decided and "ray_bootstrap_config.yaml" in decided, decided
        assert "1 node(s) up now, up to 3 node(s) in all" in run.stdout
        assert max(seen) == 3, seen  # the head and the two worker nodes the waiting trials asked for
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("autoscaling")
        trials = client.search_runs([experiment.experiment_id], f"tags.`{schema.ROLE_TAG}` = '{schema.ROLE_TRIAL}'")
        assert [t.info.status for t in trials] == ["FINISHED", "FINISHED"]
        (a, b) = [(t.info.start_time, t.info.end_time) for t in trials]
        assert max(a[0], b[0]) < min(a[1], b[1]), (a, b)  # the two trials ran at once
