"""How many test transcripts a text model has already read in training: IEMOCAP's scripted-text overlap.

IEMOCAP's scripted dialogs are performed from the same scripts in every session, so under leave-one-session-out
most scripted test sentences occur word for word among the training utterances (spoken by other actors).
A text model can then recognise a line instead of inferring an emotion from it. ``transcript_overlap`` measures
that per fold so results can say how much of a score may rest on memorised lines.

How it is computed, per fold of ``protocol``:

* the split is ``folds.split_rows(fold_spec(k, protocol), rows)``, the speaker assignment the loader uses;
  the training side is train + validation speakers (the model reads both during training);
* every transcript is normalised by ``normalise_transcript``: lower-cased; IEMOCAP's bracketed non-speech
  tokens (``[LAUGHTER]``, ``[BREATHING]``, ``[GARBAGE]``, ...) removed; apostrophes deleted (``don't`` ->
  ``dont``); every other run of characters that are not letters or digits (punctuation, underscores,
  whitespace) turned into one space; leading and trailing spaces stripped;
* a test utterance *overlaps* when its normalised transcript is not empty and equals the normalised transcript
  of at least one training-side utterance. A transcript of non-speech tokens only (``[LAUGHTER]``) normalises
  to "" and never overlaps: there is no sentence to have met (such utterances are counted in
  ``empty_test_transcripts``).

Per fold: ``test_utterances``, ``overlapping``, ``overlap_share``; ``scripted_test_utterances``,
``overlapping_scripted``, ``scripted_overlap_share``; ``improvised_test_utterances``, ``overlapping_improvised``,
``improvised_overlap_share``; ``empty_test_transcripts``. A share is ``None`` when its denominator is 0 (e.g. a
session missing from a partial corpus). ``mean`` holds the unweighted mean of each share over the folds where it
is defined (folds are averaged the same way as WA/UA).

Measured on the default synthetic corpus (``write_synthetic_corpus(out, utterances_per_session=60)``, seed 0:
300 utterances, 60 test utterances per fold, loso5)::

    fold  overlapping  scripted         improvised
    1     26/60 43.3 %  26/30  86.7 %   0/30  0.0 %
    2     24/60 40.0 %  24/30  80.0 %   0/30  0.0 %
    3     21/60 35.0 %  21/28  75.0 %   0/32  0.0 %
    4     24/60 40.0 %  24/27  88.9 %   0/33  0.0 %
    5     21/60 35.0 %  21/27  77.8 %   0/33  0.0 %
    mean        38.7 %         81.7 %          0.0 %

(seeds 1 and 2: scripted 83.4 % and 87.5 %, improvised 0.0 %; with 24 utterances per session, the test suite's
corpus, scripted 45.9 %: fewer training turns cover fewer of the script lines.)

The synthetic generator draws every scripted turn from 5 lines per (script, emotion of its words) shared by every
session that performs that script (each session performs 2 of the 3 scripts), while improvised turns are fresh
random sentences, so this is by construction; scripted lines miss only where no training turn drew the same
line. The real corpus's figure was not measured here (no licensed data on these machines): ``ser prepare`` on it
prints it and stores it in the summary (``transcript_overlap``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from ser_platform.data.folds import FoldSpec, all_folds, fold_spec, split_rows

MODES = ("improvised", "scripted")
_COLUMNS = ("id", "session", "speaker", "mode", "transcript")
_REQUIRED = ("id", "speaker", "mode", "transcript")  # session is optional: folds derive it from the speaker
_NON_SPEECH = re.compile(r"\[[^\]]*\]")  # [LAUGHTER], [BREATHING], [GARBAGE], [LIPSMACK], ...
_APOSTROPHE = re.compile(r"['\u2019]")
_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")  # \W is Unicode-aware; underscores count as punctuation here
_SHARES = ("overlap_share", "scripted_overlap_share", "improvised_overlap_share")


def normalise_transcript(text: str) -> str:
    """The form transcripts are compared in (see the module docstring): ``"Oh, [LAUGHTER] don't!"`` -> ``"oh dont"``."""
    text = _NON_SPEECH.sub(" ", text.lower())
    text = _APOSTROPHE.sub("", text)
    return _NOT_ALPHANUMERIC.sub(" ", text).strip()


def _column_lists(rows: Any) -> dict[str, list]:
    """The columns of ``_COLUMNS`` as lists, from a pyarrow Table, a mapping of columns, or an iterable of row
    mappings / objects with those attributes (``Utterance``)."""
    if hasattr(rows, "column_names") and hasattr(rows, "to_pydict"):  # pyarrow Table / RecordBatch
        missing = [c for c in _REQUIRED if c not in rows.column_names]
        if missing:
            raise ValueError(f"transcript_overlap: table lacks column(s) {missing} (has {rows.column_names})")
        return rows.select([c for c in _COLUMNS if c in rows.column_names]).to_pydict()
    if isinstance(rows, Mapping):
        missing = [c for c in _REQUIRED if c not in rows]
        if missing:
            raise ValueError(f"transcript_overlap: rows lack column(s) {missing} (have {sorted(rows)})")
        columns = {c: list(rows[c]) for c in _COLUMNS if c in rows}
        lengths = {c: len(v) for c, v in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"transcript_overlap: columns differ in length: {lengths}")
        return columns
    columns: dict[str, list] = {c: [] for c in _COLUMNS}
    for number, row in enumerate(rows):
        get = row.get if isinstance(row, Mapping) else lambda key, r=row: getattr(r, key, None)
        for c in _COLUMNS:
            value = get(c)
            if value is None and c in _REQUIRED:
                raise ValueError(f"transcript_overlap: row {number} ({get('id') or 'no id'}) has no {c!r}")
            columns[c].append(value)
    return columns


def _prepared(rows: Any) -> tuple[dict[str, list], list[str]]:
    """Checked columns and the normalised transcripts."""
    columns = _column_lists(rows)
    for number, (utterance_id, mode, text) in enumerate(zip(columns["id"], columns["mode"], columns["transcript"])):
        if mode not in MODES:
            raise ValueError(f"transcript_overlap: row {number} ({utterance_id}): mode {mode!r}, expected one of "
                             f"{MODES}")
        if not isinstance(text, str):
            raise ValueError(f"transcript_overlap: row {number} ({utterance_id}): transcript {text!r} is not a "
                             "string")
    if all(v is None for v in columns.get("session", [None])):
        columns.pop("session", None)  # split_rows then derives sessions from speakers
    return columns, [normalise_transcript(t) for t in columns["transcript"]]


def _test_and_hits(spec: FoldSpec, columns: dict[str, list], normalised: list[str]) -> tuple[list[int], list[int]]:
    """Row indices of the fold's test side, and of those whose non-empty transcript occurs on the training side
    (train + validation speakers)."""
    split = split_rows(spec, columns)
    seen = {normalised[i] for i in split["train"] + split["val"]}
    return split["test"], [i for i in split["test"] if normalised[i] and normalised[i] in seen]


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def transcript_overlap(rows: Any, protocol: str = "loso5") -> dict[str, Any]:
    """Per fold of ``protocol``, the share of test utterances whose normalised transcript occurs in that fold's
    training side (train + validation speakers), split by scripted / improvised; plus the mean over folds.

    ``rows``: utterances with id, speaker, mode (``"improvised"`` | ``"scripted"``), transcript and optionally
    session — a pyarrow Table, a mapping of columns, or an iterable of dicts or ``Utterance`` objects.
    Returns ``{"protocol", "folds": {"1": {...}, ...}, "mean": {share: value}}`` (JSON-ready; see the module
    docstring for every field).
    """
    columns, normalised = _prepared(rows)
    modes = columns["mode"]
    folds: dict[str, dict[str, Any]] = {}
    for spec in all_folds(protocol):
        test, hits = _test_and_hits(spec, columns, normalised)
        counts = {mode: sum(1 for i in test if modes[i] == mode) for mode in MODES}
        overlapping = {mode: sum(1 for i in hits if modes[i] == mode) for mode in MODES}
        folds[str(spec.fold)] = {
            "test_utterances": len(test),
            "overlapping": len(hits),
            "overlap_share": _share(len(hits), len(test)),
            "scripted_test_utterances": counts["scripted"],
            "overlapping_scripted": overlapping["scripted"],
            "scripted_overlap_share": _share(overlapping["scripted"], counts["scripted"]),
            "improvised_test_utterances": counts["improvised"],
            "overlapping_improvised": overlapping["improvised"],
            "improvised_overlap_share": _share(overlapping["improvised"], counts["improvised"]),
            "empty_test_transcripts": sum(1 for i in test if not normalised[i]),
        }
    mean: dict[str, float | None] = {}
    for key in _SHARES:
        defined = [fold[key] for fold in folds.values() if fold[key] is not None]
        mean[key] = sum(defined) / len(defined) if defined else None
    return {"protocol": protocol, "folds": folds, "mean": mean}


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f} %"


def format_overlap(overlap: Mapping[str, Any]) -> list[str]:
    """Lines for ``format_summary``: one per fold, then the mean over folds."""
    lines = [f"test transcripts also in training ({overlap['protocol']}, normalised, exact match):"]
    for fold, f in overlap["folds"].items():
        lines.append(f"  fold {fold}: {f['overlapping']}/{f['test_utterances']} ({_percent(f['overlap_share'])}); "
                     f"scripted {f['overlapping_scripted']}/{f['scripted_test_utterances']} "
                     f"({_percent(f['scripted_overlap_share'])}), improvised {f['overlapping_improvised']}/"
                     f"{f['improvised_test_utterances']} ({_percent(f['improvised_overlap_share'])})")
    m = overlap["mean"]
    lines.append(f"  mean over folds: {_percent(m['overlap_share'])}; scripted "
                 f"{_percent(m['scripted_overlap_share'])}, improvised {_percent(m['improvised_overlap_share'])}")
    return lines


def overlapping_ids(rows: Any, fold: int, protocol: str = "loso5") -> list[str]:
    """Ids of the test utterances of ``fold`` whose transcript occurs on its training side (to inspect them, or
    to score a model on the rest)."""
    columns, normalised = _prepared(rows)
    _, hits = _test_and_hits(fold_spec(fold, protocol), columns, normalised)
    return [str(columns["id"][i]) for i in hits]
