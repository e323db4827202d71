"""What identifies a run's inputs: the code's commit and the dataset's contents (logged as params of every run)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping


def git_commit(repo_dir: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the package's checkout, ``-dirty`` appended if tracked files changed. Outside a
    git checkout (an installed wheel, or a ``ray job submit --working-dir .`` upload, which leaves ``.git`` out):
    ``$SER_GIT_COMMIT`` if set (cluster/README.md passes it with the job), else ``"unknown"``."""
    where = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SER_GIT_COMMIT") or "unknown"
    return commit + ("-dirty" if dirty else "")


def dataset_fingerprint(dataset: str, summary: Mapping[str, Any] | None = None) -> str:
    """A short hash naming a Parquet dataset's contents: its files' relative names and sizes, plus its summary.

    ``dataset`` is a local path (relative ones are taken from the working directory) or an ``s3://`` / ``gs://``
    URI (``cluster.resolve_storage``). Cheap: no file is read. Two datasets with the same files, sizes and
    summary get the same fingerprint, wherever they live."""
    import pyarrow.fs as pafs

    from ser_platform.cluster import resolve_storage

    fs, root = resolve_storage(dataset)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{dataset}: no such Parquet dataset")
    if info.type == pafs.FileType.File:
        entries = [(Path(root).name, info.size)]
    else:
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        entries = sorted((f.path[len(root):].lstrip("/"), f.size) for f in found if f.type == pafs.FileType.File)
    digest = hashlib.sha256()
    for name, size in entries:
        digest.update(f"{name}\t{size}\n".encode())
    digest.update(json.dumps(summary or {}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
