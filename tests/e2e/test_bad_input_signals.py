"""Interrupted writers (issue 15, items 1 and 6): a real `ser synth` / `ser prepare` process killed by SIGINT,
SIGTERM or SIGKILL while it writes. The table-driven rest of the bad-input suite: tests/unit/test_bad_input.py.

SIGINT and SIGTERM: the process removes its partial folder and lock itself and writes nothing (an old dataset
it was replacing is untouched). SIGKILL cannot be caught: the partial folder stays, and the next run to the
same output removes it (the lock proves its writer is dead, whatever host or pid it names).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ser_platform.data.parquet import check_dataset, prepare_dataset
from ser_platform.data.synthetic import write_synthetic_corpus
from support import REPO

# SIGINT: Python's KeyboardInterrupt, which cli.main turns into one line and exit 130; when a library caught the
# same Ctrl-C and raises it again while the stack unwinds (seen with pyarrow writing), CPython ends the process by
# SIGINT after that line instead (-2 here, 130 in a shell's $? as well).
EXPECTED_EXIT = {signal.SIGINT: (130, -signal.SIGINT), signal.SIGTERM: (128 + signal.SIGTERM,),
                 signal.SIGKILL: (-signal.SIGKILL,)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Big enough (150 utterances, with features) that prepare runs for seconds, so a signal meets it midway."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("signals") / "corpus", utterances_per_session=24)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def interrupt(args: list[str], cwd: Path, partial_glob: str, signum: int) -> int:
    """Start `ser ARGS` in ``cwd``, send ``signum`` once its partial folder exists, return its exit code."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # SIGINT as a terminal delivers it, even where this test itself runs with it ignored (a background job).
    process = subprocess.Popen([sys.executable, "-m", "ser_platform.cli", *args], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        # Once the partial folder holds something: the command is writing (past its imports, where a library's
        # bare `except:` can swallow a Ctrl-C before any output exists).
        while not any(any(p.iterdir()) for p in cwd.glob(partial_glob)):
            assert process.poll() is None, f"finished before it could be interrupted: {process.stderr.read()!r}"
            assert time.monotonic() < deadline, "no partial folder appeared"
            time.sleep(0.02)
        process.send_signal(signum)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    err = process.stderr.read().decode(errors="replace")
    assert "Traceback" not in err
    if signum == signal.SIGINT:
        assert err.strip().splitlines()[-1].endswith(": interrupted")
    return process.returncode


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_prepare_interrupted(corpus, tmp_path, signum):
    old = prepare_dataset(corpus, tmp_path / "ds", rows_per_part=16)  # a dataset the run was replacing
    before = digest(tmp_path / "ds")
    code = interrupt(["prepare", "--source", str(corpus), "--out", "ds", "--overwrite", "--features"], tmp_path,
                     ".ds.partial-*", signum)
    assert code in EXPECTED_EXIT[signum]
    assert digest(tmp_path / "ds") == before and check_dataset(tmp_path / "ds") == old
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "ds")
    if signum == signal.SIGKILL:
        assert leftovers and all(n.startswith(".ds.partial-") or n == ".ds.lock" for n in leftovers), leftovers
        prepare_dataset(corpus, tmp_path / "ds", overwrite=True)  # the next run clears them
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "ds")
    assert leftovers == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_synth_interrupted(tmp_path, signum):
    code = interrupt(["synth", "corpus"], tmp_path, ".corpus.partial-*", signum)
    assert code in EXPECTED_EXIT[signum]
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    if signum == signal.SIGKILL:
        assert leftovers and all(n.startswith(".corpus.partial-") or n == ".corpus.lock" for n in leftovers)
        write_synthetic_corpus(tmp_path / "corpus", utterances_per_session=8)
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "corpus")
    assert leftovers == []
