"""The embedded default dataset: a synthetic corpus in IEMOCAP's layout and its Parquet, built once under data/demo/.

``config.data.dataset == ""`` means this dataset. It is written the first time it is needed and reused after
(only rebuilt if missing or damaged: ``check_dataset``), so the embedded default sweep needs no licensed data
and no network.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# 60 kept utterances per session (300 in all) is the synthetic corpus' own default, sized for the demo preset.
DEMO_UTTERANCES_PER_SESSION = 60
DEMO_SEED = 0


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise builders: two sweeps started at once must not write the same corpus twice (the second waits,
    then finds the dataset built). The lock file is removed when done."""
    from ser_platform.data.atomic_folder import lock_file, unlock_file
    from ser_platform.data.errors import DataError

    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = lock_file(lock_path, holder=f"the demo dataset builder, pid {os.getpid()}", wait=True)
    except OSError as err:
        raise DataError(lock_path.parent, f"cannot write the demo dataset here ({err.strerror or err}); run from "
                                          "a folder you can write to, or pass a --dataset") from None
    try:
        yield
    finally:
        unlock_file(lock_path, fd)


def ensure_demo_dataset(root: str | Path = "data/demo", *, utterances_per_session: int = DEMO_UTTERANCES_PER_SESSION,
                        seed: int = DEMO_SEED, progress: bool = True) -> str:
    """Write ``root/corpus`` (synthetic, IEMOCAP layout) and ``root/parquet`` if absent; return the dataset's
    absolute path (absolute because Ray workers and Tune trials run in other working directories).

    A dataset that fails ``check_dataset`` (a deleted or damaged part file) is rebuilt; both writers are atomic
    and replace only what they wrote themselves, so a folder of the user's own at either place is an error
    naming it, never deleted. A build killed midway leaves hidden partial folders that the next build removes.
    """
    from ser_platform.data.errors import DataError
    from ser_platform.data.parquet import check_dataset, prepare_dataset
    from ser_platform.data.synthetic import write_synthetic_corpus

    root = Path(root).expanduser().resolve()
    corpus, dataset = root / "corpus", root / "parquet"
    with _exclusive(root / ".build.lock"):
        try:
            check_dataset(dataset)
            return str(dataset)
        except DataError:
            pass  # absent or damaged: (re)build it below
        if not (corpus / "Session5").is_dir():  # a corpus of the user's own there is refused, not replaced
            write_synthetic_corpus(corpus, utterances_per_session=utterances_per_session, seed=seed,
                                   progress=progress, overwrite=True)
        prepare_dataset(str(corpus), str(dataset), overwrite=True, progress=progress)
        if progress:
            print(f"demo dataset written to {dataset} (synthetic corpus in {corpus})")
    return str(dataset)


def demo_or_given(dataset: str | None, folder: str | Path) -> tuple[str, str]:
    """(dataset, what it is) for the benchmarks: ``dataset`` as given, else the demo dataset written in ``folder``
    (the embedded default's corpus), described by its size and seed."""
    if dataset:
        return dataset, dataset
    built = ensure_demo_dataset(Path(folder) / "demo", progress=False)
    return str(built), (f"synthetic demo corpus ({DEMO_UTTERANCES_PER_SESSION} kept utterances per session, "
                        f"seed {DEMO_SEED})")
