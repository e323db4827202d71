"""Cross-validation folds over IEMOCAP's ten speakers (``Ses01F`` .. ``Ses05M``), with a validation split that
never touches the test data, so model selection (best epoch, Tune's objective) cannot see the test fold.

Protocols (``num_folds(protocol)`` folds each, numbered from 1):

``loso5`` — leave one session out, the paper's protocol (5 folds). Fold k tests on session k (both speakers).
    Validation is one speaker of the remaining four sessions: the speaker of session ``k % 5 + 1``, female in
    odd folds and male in even ones (fold 1: Ses02F, 2: Ses03M, 3: Ses04F, 4: Ses05M, 5: Ses01F), so across the
    five folds every session lends one validation speaker and both genders appear. Training: the other 7
    speakers. The validation speaker's session partner stays in training (they share dialogs, so validation is
    slightly optimistic; it is only used to select, never to report).
``loso10`` — leave one speaker out (10 folds). Fold i tests on speaker ``Ses0{(i+1)//2}{F if i odd else M}``.
    The test speaker's session partner stays in TRAINING: the two actors of a session play the same dialogs,
    so the partner's turns carry the test dialogs' topics and, for scripted dialogs, their very lines. This is
    the usual speaker-independent protocol, but it is less strict than loso5; results are not comparable.
    Validation is a speaker of the next session (``s % 5 + 1``) of the other gender, so neither the test
    speaker nor their partner is used for selection.
``session5`` — one fold: train on sessions 1-4, test on session 5. It is exactly loso5's fold 5 (validation
    speaker Ses01F), so its numbers can be checked against that fold.

Select rows by speaker (``FoldSpec.split_for``): the speaker sets are authoritative for every protocol.
``test_sessions`` lists the sessions held out whole (every speaker in test), which ``assert_no_leakage`` uses
to check that no utterance of them reaches training; it is empty for loso10, where no session is held out whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

SESSIONS = (1, 2, 3, 4, 5)
GENDERS = ("F", "M")
SPEAKERS = tuple(f"Ses0{s}{g}" for s in SESSIONS for g in GENDERS)
PROTOCOLS = ("loso5", "loso10", "session5")
_NUM_FOLDS = {"loso5": 5, "loso10": 10, "session5": 1}
_SPEAKER = re.compile(r"^Ses0(?P<session>[1-5])(?P<gender>[FM])$")


class FoldLeakageError(ValueError):
    """A test utterance, speaker or session reached the training side of a fold."""


@dataclass(frozen=True)
class FoldSpec:
    """Which speakers a fold trains, validates and tests on (see the module docstring)."""

    protocol: str
    fold: int  # 1-based
    test_sessions: frozenset[int]  # sessions held out whole (empty for loso10)
    test_speakers: frozenset[str]
    val_speakers: frozenset[str]
    train_speakers: frozenset[str]

    def split_for(self, speaker: str) -> str:
        """``"train"``, ``"val"`` or ``"test"`` for an IEMOCAP speaker (e.g. ``"Ses01F"``)."""
        for split, speakers in (("test", self.test_speakers), ("val", self.val_speakers),
                                ("train", self.train_speakers)):
            if speaker in speakers:
                return split
        raise ValueError(f"speaker {speaker!r}: not an IEMOCAP speaker (expected one of {', '.join(SPEAKERS)})")

    @property
    def name(self) -> str:
        return f"{self.protocol}/fold{self.fold}"


def num_folds(protocol: str) -> int:
    """How many folds ``protocol`` has: loso5 5, loso10 10, session5 1."""
    if protocol not in _NUM_FOLDS:
        raise ValueError(f"protocol={protocol!r}: expected one of {PROTOCOLS}")
    return _NUM_FOLDS[protocol]


def _speaker(session: int, gender: str) -> str:
    return f"Ses0{session}{gender}"


def _other(gender: str) -> str:
    return "M" if gender == "F" else "F"


def fold_spec(fold: int, protocol: str = "loso5") -> FoldSpec:
    """The speakers of fold ``fold`` (1-based) of ``protocol`` (see the module docstring for the rules)."""
    count = num_folds(protocol)
    if not isinstance(fold, int) or isinstance(fold, bool) or not 1 <= fold <= count:
        raise ValueError(f"fold={fold!r}: protocol {protocol!r} has folds 1..{count}")
    if protocol == "session5":
        return _spec_from(protocol, fold, fold_spec(5, "loso5"))
    if protocol == "loso5":
        test_sessions = frozenset({fold})
        test = frozenset(_speaker(fold, g) for g in GENDERS)
        val = frozenset({_speaker(fold % 5 + 1, "F" if fold % 2 == 1 else "M")})
    else:  # loso10
        session, gender = (fold + 1) // 2, "F" if fold % 2 == 1 else "M"
        test_sessions = frozenset()
        test = frozenset({_speaker(session, gender)})
        val = frozenset({_speaker(session % 5 + 1, _other(gender))})
    train = frozenset(SPEAKERS) - test - val
    return FoldSpec(protocol, fold, test_sessions, test, val, train)


def _spec_from(protocol: str, fold: int, spec: FoldSpec) -> FoldSpec:
    return FoldSpec(protocol, fold, spec.test_sessions, spec.test_speakers, spec.val_speakers, spec.train_speakers)


def all_folds(protocol: str = "loso5") -> list[FoldSpec]:
    """Every fold of ``protocol``, in order."""
    return [fold_spec(k, protocol) for k in range(1, num_folds(protocol) + 1)]


# --- the leakage guard -------------------------------------------------------------------------------------

def _columns(rows: Any) -> dict[str, list]:
    """``speaker`` (required), ``session`` and ``id`` (optional) as lists, from a column mapping (a Ray Data
    numpy batch, a dict of lists), a pandas DataFrame, or an iterable of row mappings / ``Utterance`` objects."""
    if hasattr(rows, "columns") and hasattr(rows, "to_dict"):  # pandas
        return {c: list(rows[c]) for c in ("speaker", "session", "id") if c in rows.columns}
    if isinstance(rows, Mapping):
        if "speaker" not in rows:
            raise ValueError(f"rows: need a 'speaker' column, got columns {sorted(rows)}")
        return {c: list(rows[c]) for c in ("speaker", "session", "id") if c in rows}
    out: dict[str, list] = {"speaker": [], "session": [], "id": []}
    for number, row in enumerate(rows):
        get = row.get if isinstance(row, Mapping) else lambda key, default=None, r=row: getattr(r, key, default)
        speaker = get("speaker")
        if speaker is None:
            raise ValueError(f"rows: row {number} has no 'speaker'")
        out["speaker"].append(speaker)
        out["session"].append(get("session"))
        out["id"].append(get("id", f"row {number}"))
    return out


def _session_of(speaker: str, row: str) -> int:
    m = _SPEAKER.match(str(speaker))
    if m is None:
        raise ValueError(f"{row}: speaker {speaker!r} is not an IEMOCAP speaker (expected Ses0<1-5><F|M>)")
    return int(m.group("session"))


def _describe(ids: list[str], limit: int = 3) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"{len(ids)} row(s): {shown}" + (", ..." if len(ids) > limit else "")


def assert_no_leakage(train_rows: Any, test_rows: Any, spec: FoldSpec | None = None) -> None:
    """Raise ``FoldLeakageError`` if anything of the test side reaches the training side.

    Always checked: no utterance id and no speaker on both sides. With ``spec``: no utterance of a session the
    fold holds out whole (``spec.test_sessions``) and no test speaker in training, and every test row's
    speaker is one of ``spec.test_speakers``. Pass train and validation rows together as ``train_rows``
    (neither may see the test fold); call it again with (train, val) to keep those apart too.
    """
    train, test = _columns(train_rows), _columns(test_rows)
    where = f"{spec.name}: " if spec is not None else ""
    train_ids = [str(i) for i in train.get("id", [f"train row {n}" for n in range(len(train["speaker"]))])]
    test_ids = set(str(i) for i in test.get("id", []))
    shared = [i for i in train_ids if i in test_ids]
    if shared:
        raise FoldLeakageError(f"{where}test utterances also in training: {_describe(shared)}")

    test_speakers = set(test["speaker"])
    if spec is not None:
        strays = sorted(test_speakers - spec.test_speakers)
        if strays:
            raise FoldLeakageError(f"{where}test rows from speakers {strays}, expected only "
                                   f"{sorted(spec.test_speakers)}")
        test_speakers |= spec.test_speakers
    leaked = [(i, s) for i, s in zip(train_ids, train["speaker"]) if s in test_speakers]
    if leaked:
        speakers = sorted({s for _, s in leaked})
        raise FoldLeakageError(f"{where}test speaker(s) {speakers} in training: {_describe([i for i, _ in leaked])}")

    if spec is not None and spec.test_sessions:
        sessions = train.get("session") or [None] * len(train_ids)
        held_out = [
            i for i, speaker, session in zip(train_ids, train["speaker"], sessions)
            if (int(session) if session is not None else _session_of(speaker, i)) in spec.test_sessions
        ]
        if held_out:
            raise FoldLeakageError(f"{where}utterances of held-out session(s) {sorted(spec.test_sessions)} in "
                                   f"training: {_describe(held_out)}")


def split_rows(spec: FoldSpec, rows: Iterable[Any] | Mapping[str, Any]) -> dict[str, list[int]]:
    """Row indices per split (``{"train": [...], "val": [...], "test": [...]}``) of ``rows`` under ``spec``.

    An in-memory reference for the Ray Data loader: it assigns each row by its speaker, then runs the guard.
    """
    columns = _columns(rows)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for index, speaker in enumerate(columns["speaker"]):
        out[spec.split_for(str(speaker))].append(index)

    def pick(indices: list[int]) -> dict[str, list]:
        return {key: [values[i] for i in indices] for key, values in columns.items()}

    assert_no_leakage(pick(out["train"] + out["val"]), pick(out["test"]), spec)
    assert_no_leakage(pick(out["train"]), pick(out["val"]))
    return out
