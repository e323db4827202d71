"""environment.check_cluster on the tier's Ray instance: every alive node reports from a task pinned to it; the
settings init_ray gives a local Ray reach its processes."""

from __future__ import annotations

import os

import pytest

from ser_platform.environment import EnvironmentMismatch, check_cluster, node_reports, versions
from ser_platform.ray_train import LOCAL_POLL_INTERVAL_S, POLL_INTERVAL_ENV

ORIGINAL_ENV = dict(os.environ)  # as pytest started, before the tier's Ray instance


def test_every_node_reports_its_versions_and_a_difference_stops_the_run(ray_cluster):
    import ray

    reports = node_reports()
    assert sorted(reports) == sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    assert all(report["versions"] == versions() for report in reports.values())
    assert check_cluster() == versions()
    expected = {**versions(), "ray": "2.59.0"}
    with pytest.raises(EnvironmentMismatch, match=r"node \S+ \(\w{8}\): ray 2\.60\.\d+ \(driver: 2\.59\.0\)"):
        check_cluster(expected)


def test_a_local_ray_polls_train_workers_every_half_second_and_runs_no_preemption_watcher(ray_cluster):
    """init_ray's settings for a local Ray reach the processes Ray starts (Ray Train's controller reads them there):
    the 0.5 s poll (benchmarks/poll.py) unless the caller chose another, no preemption watcher."""
    import ray

    keys = (POLL_INTERVAL_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

    @ray.remote(num_cpus=0)
    def settings() -> dict:
        return {key: os.environ.get(key) for key in keys}

    chosen = {key: os.environ.get(key) for key in keys}  # this process's, which Ray's processes inherit
    assert chosen[POLL_INTERVAL_ENV] is not None and chosen["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"]
    if POLL_INTERVAL_ENV not in ORIGINAL_ENV:
        assert float(chosen[POLL_INTERVAL_ENV]) == LOCAL_POLL_INTERVAL_S
    assert ray.get(settings.remote()) == chosen
