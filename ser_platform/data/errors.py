"""The one error type of the data layer: a message that names the file (or row) and what is wrong."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad input data. The message always names the offending file or row and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class SkippedInput:
    """An input skipped under ``--skip-bad``: where it was and why."""

    path: str
    problem: str


def file_problem(path: str | Path) -> str | None:
    """What stops ``path`` being read as a regular file, phrased for a ``DataError`` ("missing", "cannot read it
    (Permission denied ...)", "is a folder", "is a FIFO"), or None. Never opens a FIFO, which would block."""
    try:
        mode = Path(path).stat().st_mode
        if stat.S_ISREG(mode):
            with open(path, "rb"):
                return None
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return unreadable(err)
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    return "is a FIFO, not a file" if stat.S_ISFIFO(mode) else "is not a regular file"


def unreadable(err: OSError) -> str:
    """The problem of an ``OSError`` met reading a file or folder, phrased for a ``DataError``."""
    return f"cannot read it ({err.strerror or err}; check its permissions and those of the folders above it)"
