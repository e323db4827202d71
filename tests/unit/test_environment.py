"""environment.py without Ray: what is compared, and how a difference is named."""

from __future__ import annotations

import importlib.metadata

import pytest

from ser_platform import environment
from ser_platform.environment import EnvironmentMismatch, check_worker, differences, versions


def test_versions_are_the_installed_distributions():
    found = versions()
    assert set(found) == set(environment.PACKAGES) | {"python"}
    for name in ("torch", "ray", "transformers", "mlflow", "pyarrow"):
        assert found[name] == importlib.metadata.version(name)
    assert found["ser_platform"] == importlib.metadata.version("ser_platform")


def test_a_worker_with_other_versions_is_named_with_each_difference():
    driver = versions()
    check_worker(driver)  # the same process: nothing differs
    check_worker(None)  # nothing to compare with (a run started before the check existed)
    other = {**driver, "torch": "2.10.0", "transformers": "5.0.1"}
    assert differences(other, driver) == {"torch": ("2.10.0", driver["torch"]),
                                          "transformers": ("5.0.1", driver["transformers"])}
    with pytest.raises(EnvironmentMismatch, match=rf"torch {driver['torch']} \(driver: 2.10.0\).*transformers"):
        check_worker(other)
    assert differences(driver, {k: v for k, v in driver.items() if k != "mlflow"}) == {
        "mlflow": (driver["mlflow"], "absent")}
