"""The embedded default dataset: a synthetic corpus in IEMOCAP's layout and its Parquet, built once under data/demo/.

``config.data.dataset == ""`` means this dataset. It is written the first time it is needed and reused after
(only rebuilt if missing or unreadable), so the embedded default sweep needs no licensed data and no network.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# 60 kept utterances per session (300 in all) is the synthetic corpus' own default, sized for the demo preset.
DEMO_UTTERANCES_PER_SESSION = 60
DEMO_SEED = 0


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise builders: two sweeps started at once must not write the same corpus twice."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _readable(dataset: Path) -> bool:
    from ser_platform.data.parquet import read_summary

    if not dataset.exists():
        return False
    try:
        read_summary(str(dataset))
    except (OSError, ValueError):
        return False
    return True


def ensure_demo_dataset(root: str | Path = "data/demo", *, utterances_per_session: int = DEMO_UTTERANCES_PER_SESSION,
                        seed: int = DEMO_SEED, progress: bool = True) -> str:
    """Write ``root/corpus`` (synthetic, IEMOCAP layout) and ``root/parquet`` if absent; return the dataset's
    absolute path (absolute because Ray workers and Tune trials run in other working directories)."""
    from ser_platform.data.parquet import prepare_dataset
    from ser_platform.data.synthetic import write_synthetic_corpus

    root = Path(root).expanduser().resolve()
    corpus, dataset = root / "corpus", root / "parquet"
    with _exclusive(root / ".build.lock"):
        if _readable(dataset):
            return str(dataset)
        if not (corpus / "Session5").is_dir():
            # Written under a temporary name and renamed, so an interrupted build never looks complete.
            tmp = root / f".corpus.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            write_synthetic_corpus(tmp, utterances_per_session=utterances_per_session, seed=seed, progress=progress)
            shutil.rmtree(corpus, ignore_errors=True)
            os.replace(tmp, corpus)
        prepare_dataset(str(corpus), str(dataset), overwrite=dataset.exists(), progress=progress)
        if progress:
            print(f"demo dataset written to {dataset} (synthetic corpus in {corpus})")
    return str(dataset)
