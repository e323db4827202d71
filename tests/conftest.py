"""Fixtures every tier shares, and the tier markers.

Tiers (README, "Tests and benchmarks"): ``unit/`` starts no Ray and no server; ``integration/`` starts the
session's local Ray instance (``integration/conftest.py``) or trains end to end in process for minutes;
``e2e/`` goes through `ray job submit` to a head of its own or through a real `mlflow server`. The markers follow
from the directory (``pytest_collection_modifyitems`` below), so `-m "not slow and not ray"` is the fast tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pyarrow.parquet as pq

from ser_platform.data.parquet import prepare_dataset
from ser_platform.data.synthetic import write_synthetic_corpus

TESTS = Path(__file__).resolve().parent
# Fixtures that start Ray: the session's local instance and the e2e modules' own heads (their own shapes: a head
# under `ray start --block` with token auth, tests/e2e/test_cluster_auth.py; one that jobs are submitted to,
# tests/e2e/test_sweep_e2e.py). A test that starts Ray some other way carries @pytest.mark.ray itself.
RAY_FIXTURES = {"ray_cluster", "token_head", "ray_head"}


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a small synthetic ``IEMOCAP_full_release`` (Session1..5), written once per test session.

    24 kept utterances per session (120 in all: 35 happy, 25 angry, 25 sad, 35 neutral) plus 30 with dropped
    labels, seed 0. Shared by every test: copy it (e.g. ``shutil.copytree``) before changing anything.
    """
    return write_synthetic_corpus(
        tmp_path_factory.mktemp("synthetic") / "IEMOCAP_full_release", utterances_per_session=24, seed=0
    )


@pytest.fixture(scope="session")
def featured_dataset(synthetic_corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """(summary, path, table) of ``synthetic_corpus`` prepared with features, once per session. Read only."""
    out = tmp_path_factory.mktemp("featured") / "iemocap.parquet"
    summary = prepare_dataset(synthetic_corpus, out, features=True)
    return summary, out, pq.read_table(out)


@pytest.fixture(scope="session")
def training_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Parquet dataset the training tests share (Ray Train, seeds, the encoder cache, the job), prepared once.

    A smaller corpus than ``synthetic_corpus``, for training speed: 8 kept utterances per session (40 in all),
    seed 1. Read only: a test that writes beside it (the encoder cache does) works on a ``shutil.copytree``.
    """
    root = tmp_path_factory.mktemp("training")
    corpus = write_synthetic_corpus(root / "IEMOCAP_full_release", utterances_per_session=8, seed=1)
    prepare_dataset(corpus, root / "parquet", progress=False)
    return str(root / "parquet")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cluster", action="store_true",
                     help="also run the cluster tier: tests that start a multi-node Ray cluster of their own (a head "
                          "and worker nodes, an S3 server; ~10 min on 2 cores)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tier markers from the directory; a test in the wrong tier stops the run naming it and where it belongs.
    The cluster tier is skipped, saying how to run it, unless ``--cluster`` is given. Tests marked ``head_start``
    run last (their work has been running in the background since collection ended)."""
    items.sort(key=lambda item: item.get_closest_marker("head_start") is not None)  # stable: the rest keep order
    skip_cluster = pytest.mark.skip(reason="the cluster tier (several Ray nodes of its own): run with --cluster")
    for item in items:
        if item.get_closest_marker("cluster") is not None and not config.getoption("--cluster"):
            item.add_marker(skip_cluster)
        path = item.path.resolve()
        tier = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else None
        uses_ray = bool(RAY_FIXTURES & set(item.fixturenames)) or item.get_closest_marker("ray") is not None
        if tier == "unit":
            if uses_ray or item.get_closest_marker("e2e"):
                raise pytest.UsageError(f"{item.nodeid}: starts Ray or a server; it belongs in tests/integration "
                                        "or tests/e2e")
        elif tier == "integration":
            if uses_ray:
                item.add_marker(pytest.mark.ray)
            elif item.get_closest_marker("slow") is None:
                raise pytest.UsageError(f"{item.nodeid}: neither starts Ray nor is marked slow; it belongs in "
                                        "tests/unit")
        elif tier == "e2e":
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)  # a server or a head starts first: seconds at the least
            if uses_ray:
                item.add_marker(pytest.mark.ray)
        else:
            raise pytest.UsageError(f"{item.nodeid}: outside tests/unit, tests/integration and tests/e2e")


# --- head starts: a slow test's work started at the end of collection --------------------------------------------
#
# ``@pytest.mark.head_start(function, *args)``: ``function(workdir, *args)`` starts in a background process at the
# lowest CPU priority as soon as collection ends (support.HeadStart), so it uses the CPU that the tests before it
# leave idle (a third of the suite's CPU time on 2 cores: servers, heads and subprocesses starting, outages waited
# out). It does not come free: while it runs the other tests took ~1.2x their time (what the cores share in hardware),
# which costs less than its minutes added at the end. The test runs last and gets it from the ``head_start`` fixture
# to wait for the value. Alone (`pytest path::test`) it is the same work started a moment earlier. With no ``args``,
# write ``pytest.mark.head_start.with_args(function)``: a mark called with a lone function decorates that function.

_HEAD_STARTS = pytest.StashKey[dict]()


def _start_ahead(item: pytest.Item):
    """``item``'s head start, started now (it is marked ``head_start``)."""
    from support import HeadStart

    marker = item.get_closest_marker("head_start")
    if marker is None or not marker.args or not callable(marker.args[0]):
        raise pytest.UsageError(f"{item.nodeid}: head_start takes the function to start, then its args "
                                "(@pytest.mark.head_start(function, *args))")
    return HeadStart(marker.args[0], marker.args[1:])


def pytest_collection_finish(session: pytest.Session) -> None:
    starts = session.config.stash.setdefault(_HEAD_STARTS, {})
    if session.config.option.collectonly:
        return
    for item in session.items:
        if item.get_closest_marker("head_start") is not None and item.get_closest_marker("skip") is None:
            starts[item.nodeid] = _start_ahead(item)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for start in session.config.stash.get(_HEAD_STARTS, {}).values():
        start.stop()


@pytest.fixture
def head_start(request: pytest.FixtureRequest):
    """The test's ``support.HeadStart`` (started at collection's end; started now if it was not)."""
    starts = request.config.stash.setdefault(_HEAD_STARTS, {})
    if request.node.nodeid not in starts:
        starts[request.node.nodeid] = _start_ahead(request.node)
    return starts[request.node.nodeid]
