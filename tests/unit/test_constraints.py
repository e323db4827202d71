"""cluster/constraints.txt, the pins every node and the image install with: up to date with the environment the
tests run in, complete for the project's dependencies, and the same versions pip itself reports."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from packaging.utils import canonicalize_name

from support import REPO

SCRIPT = REPO / "cluster" / "constraints.py"


@pytest.fixture(scope="module")
def constraints():
    spec = importlib.util.spec_from_file_location("cluster_constraints", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def test_committed_file_matches_this_environment(constraints, capsys):
    status = constraints.main(["--check"])
    assert status == 0, capsys.readouterr().err  # names the differences and says: run python cluster/constraints.py


def test_check_names_a_stale_pin(constraints, tmp_path, monkeypatch, capsys):
    stale = tmp_path / "constraints.txt"
    stale.write_text(re.sub(r"^ray==\S+$", "ray==2.49.0", constraints.CONSTRAINTS.read_text(), flags=re.M))
    monkeypatch.setattr(constraints, "CONSTRAINTS", stale)
    assert constraints.main(["--check"]) == 1
    assert "ray==2.49.0" in capsys.readouterr().err


def test_every_dependency_is_pinned_as_installed(constraints):
    pinned = pins(constraints.CONSTRAINTS.read_text())
    for requirement in constraints.project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, requirement
        assert requirement.specifier.contains(pinned[name], prereleases=True), (requirement, pinned[name])
    # What the driver compares across nodes at job start, and what the extras bring (ray[default] -> aiohttp).
    assert {"torch", "torchaudio", "ray", "transformers", "mlflow", "aiohttp", "psycopg-binary"} <= set(pinned)


def test_pins_are_what_pip_reports_and_leave_out_the_test_tools(constraints):
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout
    installed = {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", freeze, re.M)}
    pinned = pins(constraints.CONSTRAINTS.read_text())
    assert {name: installed.get(name) for name in pinned} == pinned
    assert "pytest" in installed and "pytest" not in pinned
