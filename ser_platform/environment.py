"""One environment on every node: the versions that must match across the driver and every Ray node.

A cluster's nodes install the project in their set-up commands (cluster/*.yaml, cluster/Dockerfile pins them with
cluster/constraints.txt); a node added later by the autoscaler, or one whose set-up resolved a newer release, can
still differ from the driver. Mismatched torch / transformers / ray between DDP ranks, or between the process that
pickles a config and the one that reads it, fail late and obscurely, so the entry points compare before any work:

    check_cluster()            every alive node's versions against the driver's; EnvironmentMismatch lists them
    check_worker(expected)     one process against the driver's (each Ray Train worker: nodes added later)
"""

from __future__ import annotations

import importlib.metadata
import platform
import socket
from typing import Any, Mapping

# What must be the same everywhere: the libraries whose objects cross processes or whose numbers a run depends on
# (models, tokenizers, the losses, configs, datasets, Ray's own protocol), and the project itself. The rest of the
# environment is pinned by cluster/constraints.txt.
PACKAGES = ("torch", "torchaudio", "ray", "transformers", "tokenizers", "pytorch-metric-learning", "mlflow",
            "optuna", "pyarrow", "numpy", "ser_platform")


class EnvironmentMismatch(ValueError):
    """A node's (or worker's) versions differ from the driver's; the message lists every difference."""


def versions() -> dict[str, str]:
    """This process's versions of ``PACKAGES`` ("absent" for one that is not installed) and Python's. The project's
    git commit is not compared: a job's code reaches every node in its ``--working-dir`` package, identical by
    construction, and a commit made while a local run goes on would fail its next worker for nothing."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    found["python"] = platform.python_version()
    return found


def differences(expected: Mapping[str, str], found: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """name -> (expected, found) for every package whose version differs."""
    return {name: (expected[name], found.get(name, "absent")) for name in expected
            if found.get(name, "absent") != expected[name]}


def describe(where: str, diff: Mapping[str, tuple[str, str]]) -> str:
    return f"{where}: " + ", ".join(f"{name} {found} (driver: {want})" for name, (want, found) in sorted(diff.items()))


def _node_report() -> dict[str, Any]:
    return {"host": socket.gethostname(), "versions": versions()}


def node_reports(timeout_s: float = 120.0) -> dict[str, dict[str, Any]]:
    """node id -> {"host", "versions"} for every alive node, from a zero-CPU task pinned to each one."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    report = ray.remote(num_cpus=0)(_node_report)
    alive = [node["NodeID"] for node in ray.nodes() if node.get("Alive")]
    refs = {node: report.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in alive}
    return dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))


def check_cluster(expected: Mapping[str, str] | None = None) -> dict[str, str]:
    """Compare every alive node with the driver (``expected``: default this process's ``versions()``); raise
    ``EnvironmentMismatch`` naming each node and each difference. Returns the driver's versions (what the
    workers then check themselves against, ``check_worker``)."""
    expected = dict(expected or versions())
    problems = []
    for node, report in sorted(node_reports().items()):
        diff = differences(expected, report["versions"])
        if diff:
            problems.append(describe(f"node {report['host']} ({node[:8]})", diff))
    if problems:
        raise EnvironmentMismatch("the cluster's nodes do not run the driver's versions: " + "; ".join(problems)
                                  + ". Install the same versions on every node (cluster/constraints.txt, or the "
                                    "image of cluster/Dockerfile)")
    return expected


def check_worker(expected: Mapping[str, str] | None) -> None:
    """In a worker (a node the autoscaler may have added after the job started): the driver's versions, or
    ``EnvironmentMismatch`` naming this host and what differs. ``None``: nothing to compare with."""
    if not expected:
        return
    diff = differences(expected, versions())
    if diff:
        raise EnvironmentMismatch(describe(f"worker on {socket.gethostname()}", diff))
