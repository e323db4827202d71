"""The integration tier's Ray instance: one for the tier, started by the first test that asks for it and stopped
when the tier's last test is done (package scope), so the unit tests that run after it share no CPU with an idle
Ray (its raylet, GCS, dashboard agent and prestarted workers)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[str]:
    """One local Ray instance for every integration test; yields its GCS address (for drivers in subprocesses).

    ``address="local"`` always starts a fresh instance (never someone else's cluster, whatever RAY_ADDRESS says;
    its files go under RAY_TMPDIR); 2 logical CPUs like the target laptop; no dashboard, no worker logs on the
    driver; started by ``init_ray`` as ``ser`` starts a local Ray (no preemption watcher, Ray Train's 0.5 s
    poll). The tests that need another shape start their own: tests/integration/test_cluster_gpu.py (a cluster
    that declares GPUs) and the e2e heads (tests/conftest.py, RAY_FIXTURES).
    """
    import ray

    from ser_platform.ray_train import init_ray

    saved = dict(os.environ)  # init_ray's settings for a local Ray reach this instance, not later tests
    init_ray("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
