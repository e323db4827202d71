"""``resources.worker_cpus``: how the auto CPU share splits a cluster among trials and workers (computed, no Ray
started; moved here from tests/integration/test_ray_train.py)."""

from __future__ import annotations

import pytest

from ser_platform.config import load_config


def test_auto_cpus_share_the_cluster_among_trials_and_workers():
    from ser_platform.resources import TRIAL_CPU, worker_cpus

    auto = load_config("demo")  # cpus_per_worker=0: auto
    assert auto.train.cpus_per_worker == 0
    assert worker_cpus(auto, 2.0) == pytest.approx(2.0 - TRIAL_CPU)  # one trial, one worker: every CPU but its own
    two = auto.replace({"train.num_workers": 2, "sweep.max_concurrent": 2})
    assert worker_cpus(two, 8.0) == pytest.approx((4.0 - TRIAL_CPU) / 2, abs=0.01)
    assert 2 * 2 * worker_cpus(two, 8.0) + 2 * TRIAL_CPU <= 8.0  # everything fits at once
    fixed = auto.replace({"train.cpus_per_worker": 1.0})
    assert worker_cpus(fixed, 2.0) == 1.0
    streaming = fixed.replace({"data.materialize": False, "train.num_workers": 2})
    assert worker_cpus(streaming, 2.0) == 0.5  # one CPU stays free for Ray Data's read tasks
