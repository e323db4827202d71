"""environment.check_cluster on the tier's Ray instance: every alive node reports from a task pinned to it."""

from __future__ import annotations

import pytest

from ser_platform.environment import EnvironmentMismatch, check_cluster, node_reports, versions


def test_every_node_reports_its_versions_and_a_difference_stops_the_run(ray_cluster):
    import ray

    reports = node_reports()
    assert sorted(reports) == sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    assert all(report["versions"] == versions() for report in reports.values())
    assert check_cluster() == versions()
    expected = {**versions(), "ray": "2.59.0"}
    with pytest.raises(EnvironmentMismatch, match=r"node \S+ \(\w{8}\): ray 2\.60\.\d+ \(driver: 2\.59\.0\)"):
        check_cluster(expected)
