"""Fixtures shared across the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from ser_platform.data.synthetic import write_synthetic_corpus


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a small synthetic ``IEMOCAP_full_release`` (Session1..5), written once per test session.

    24 kept utterances per session (120 in all: 35 happy, 25 angry, 25 sad, 35 neutral) plus 30 with dropped
    labels, seed 0. Shared by every test: copy it (e.g. ``shutil.copytree``) before changing anything.
    """
    return write_synthetic_corpus(
        tmp_path_factory.mktemp("synthetic") / "IEMOCAP_full_release", utterances_per_session=24, seed=0
    )
