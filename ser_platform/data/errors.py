"""The one error type of the data layer: a message that names the file (or row) and what is wrong."""

from __future__ import annotations

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
