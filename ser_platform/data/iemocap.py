"""Parse an IEMOCAP release (real or synthetic) into 4-class :class:`Utterance` records.

``root`` is the ``IEMOCAP_full_release`` folder itself, the one that holds ``Session1`` .. ``Session5``.
Any subset of sessions may be present. Per session the parser reads three things:

``SessionN/dialog/EmoEvaluation/DIALOG.txt`` (top level only; the ``Categorical/``, ``Attribute/`` and
``Self-evaluation/`` subfolders hold per-evaluator files and are ignored)::

    % [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]

    [6.2901 - 8.2357]	Ses01F_impro01_F000	neu	[2.5000, 2.5000, 2.5000]
    C-E2:	Neutral;	()
    A-E3:	val 3; act 2; dom  2;	()

Only the bracketed category lines are utterances; the evaluator lines under them are not.

``SessionN/dialog/transcriptions/DIALOG.txt``::

    Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.

Lines for ids without an evaluation (``..._MXX0``) or without an id at all are ignored.

``SessionN/sentences/wav/DIALOG/UTT_ID.wav``: 16 kHz mono 16-bit PCM. Only the header is read here
(duration); decoding and the sample-rate/channel checks belong to ``data/parquet.py``.

Labels follow the paper (§3.1) and the works it compares with: ``exc`` merges into happy; ``ang``, ``hap``,
``neu``, ``sad`` map to their class; ``fru sur fea dis oth xxx`` are dropped and counted. The real corpus has
10,039 evaluated utterances (neu 1,708, fru 1,849, ang 1,103, sad 1,084, exc 1,041, hap 595, sur 107,
fea 40, oth 3, dis 2, xxx 2,507) and so yields 5,531 utterances: 1,636 happy (595 hap + 1,041 exc),
1,084 sad, 1,103 angry and 1,708 neutral (``PAPER_COUNTS``).

The speaker of an utterance is the session plus the letter that starts the id's last part
(``Ses01F_impro01_M000`` is spoken by ``Ses01M``); the letter after ``SesNN`` in the dialog name only says
which actor wore the motion-capture markers.

Bad input raises :class:`DataError` naming the file (and line) and the problem; with ``skip_bad=True`` the
utterance is skipped instead and a :class:`SkippedInput` recorded, except when there is nothing to parse at
all (no root, no session folder, a root that cannot be read), which always raises. Among the bad inputs:

* text files that are not UTF-8 (a UTF-8 byte-order mark is fine): guessing another encoding would store
  wrong words without a word (``café`` read as Latin-1 is ``cafÃ©``); the error names the byte and line;
* files and folders that cannot be read (permissions): named, never silently dropped; an unreadable
  EmoEvaluation folder skips its session, an unreadable transcription or wav file its utterances;
* an utterance id on two transcript lines with different texts (naming both lines): which one is right
  cannot be known. The same line repeated word for word is read once, since it is unambiguous.
"""

from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import soundfile

from ser_platform.data.errors import DataError, SkippedInput, file_problem, unreadable

CLASSES = ("angry", "happy", "neutral", "sad")
LABEL_MAP = {"ang": "angry", "hap": "happy", "exc": "happy", "neu": "neutral", "sad": "sad"}
DROPPED_LABELS = ("fru", "sur", "fea", "dis", "oth", "xxx")
PAPER_COUNTS = {"happy": 1636, "sad": 1084, "angry": 1103, "neutral": 1708}

_SESSION_DIR = re.compile(r"^Session([1-5])$")
# "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]"; whitespace kept loose on purpose.
_CATEGORY_LINE = re.compile(
    r"^\[\s*(?P<start>\d+(?:\.\d*)?)\s*-\s*(?P<end>\d+(?:\.\d*)?)\s*\]\s+"
    r"(?P<id>\S+)\s+(?P<label>\S+)\s+\[(?P<vad>[^\]]*)\]\s*$"
)
# Any mention of an utterance id marks a line that was meant to be a category line.
_MENTIONS_ID = re.compile(r"\bSes\d\d[FM]_\S+_[FM]\d+\b")
# The last part of an utterance id: the speaking actor's letter and the turn number ("F000").
_TURN = re.compile(r"^(?P<speaker>[FM])\d+$")
# "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me." The text itself may hold brackets and colons.
_TRANSCRIPT_LINE = re.compile(r"^(?P<id>\S+)\s+\[[^\]]*\]:\s?(?P<text>.*)$")


@dataclass(frozen=True)
class Utterance:
    id: str  # e.g. "Ses01F_impro01_M000"
    session: int  # 1..5
    speaker: str  # the speaking actor, e.g. "Ses01M"
    gender: str  # "F" | "M"
    mode: str  # "improvised" | "scripted"
    label: str  # one of CLASSES
    raw_label: str  # as written in EmoEvaluation, e.g. "exc"
    transcript: str
    wav_path: str  # absolute path of SessionN/sentences/wav/DIALOG/UTT_ID.wav
    duration: float  # seconds, from the wav header


@dataclass
class ParseResult:
    utterances: list[Utterance]  # sorted by id
    dropped: collections.Counter = field(default_factory=collections.Counter)  # raw label -> count
    skipped: list[SkippedInput] = field(default_factory=list)  # bad inputs skipped under skip_bad=True

    def counts(self) -> dict[str, int]:
        """Utterances per class, every class present (0 where none)."""
        found = collections.Counter(u.label for u in self.utterances)
        return {c: found[c] for c in CLASSES}


@dataclass(frozen=True)
class _Evaluation:
    """One category line of an EmoEvaluation file."""

    id: str
    raw_label: str
    source: Path
    line_number: int


def parse_iemocap(root: str | Path, *, skip_bad: bool = False, progress: bool = False) -> ParseResult:
    """Read every session under ``root`` into 4-class utterances (see the module docstring)."""
    root = Path(root).expanduser().absolute()
    sessions = _session_dirs(root)
    dialog_files = []
    result = ParseResult(utterances=[])
    for number, session_dir in sessions:
        emo_dir = session_dir / "dialog" / "EmoEvaluation"
        try:
            files = _dialog_files(emo_dir)
        except DataError as err:
            _fail_or_skip(result, skip_bad, err.path, err.problem)
            continue
        dialog_files += [(number, session_dir, f) for f in files]

    if progress:
        from tqdm.auto import tqdm

        dialog_files = tqdm(dialog_files, desc="IEMOCAP dialogs", unit="dialog")
    for number, session_dir, emo_file in dialog_files:
        result.utterances += _parse_dialog(number, session_dir, emo_file, skip_bad, result)

    result.utterances.sort(key=lambda u: u.id)
    return result


def _session_dirs(root: Path) -> list[tuple[int, Path]]:
    try:
        if not root.exists():
            raise DataError(root, "folder does not exist")
        if not root.is_dir():
            raise DataError(root, "is not a folder; expected the IEMOCAP_full_release folder")
        with os.scandir(root) as listing:
            entries = [(entry.name, entry.is_dir()) for entry in listing]
    except OSError as err:
        raise DataError(root, unreadable(err)) from None
    sessions = sorted((int(m.group(1)), root / name) for name, is_dir in entries
                      if is_dir and (m := _SESSION_DIR.match(name)))
    if not sessions:
        hint = ""
        if (root / "IEMOCAP_full_release").is_dir():
            hint = f"; did you mean {root / 'IEMOCAP_full_release'}?"
        raise DataError(root, f"no Session1..Session5 folder found; expected the IEMOCAP_full_release folder{hint}")
    return sessions


def _dialog_files(emo_dir: Path) -> list[Path]:
    """The dialog files at the top of an EmoEvaluation folder; ``DataError`` if there are none or it is unreadable."""
    try:
        with os.scandir(emo_dir) as listing:
            files = sorted(Path(e.path) for e in listing
                           if e.name.endswith(".txt") and not e.name.startswith(".") and e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(emo_dir, "folder missing (is the session complete?)") from None
    except OSError as err:
        raise DataError(emo_dir, unreadable(err)) from None
    if not files:
        raise DataError(emo_dir, "no dialog .txt files (is the session complete?)")
    return files


def _fail_or_skip(result: ParseResult, skip_bad: bool, path: str | Path, problem: str) -> None:
    if not skip_bad:
        raise DataError(path, problem)
    result.skipped.append(SkippedInput(str(path), problem))


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark is dropped); ``DataError`` naming the file otherwise."""
    problem = file_problem(path)
    if problem:
        raise DataError(path, "file missing" if problem == "missing" else problem)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(path, unreadable(err)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(path, f"line {line}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); "
                              "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    return text.splitlines()


def _parse_dialog(
    session: int, session_dir: Path, emo_file: Path, skip_bad: bool, result: ParseResult
) -> list[Utterance]:
    dialog = emo_file.stem
    evaluations = _read_evaluations(session, dialog, emo_file, skip_bad, result)
    kept = []
    for ev in evaluations:
        if ev.raw_label in LABEL_MAP:
            kept.append(ev)
        elif ev.raw_label in DROPPED_LABELS:
            result.dropped[ev.raw_label] += 1
        else:
            _fail_or_skip(
                result,
                skip_bad,
                ev.source,
                f"line {ev.line_number}: unknown label {ev.raw_label!r} for {ev.id} "
                f"(known: {', '.join(sorted(LABEL_MAP))}; dropped: {', '.join(DROPPED_LABELS)})",
            )
    if not kept:
        return []

    transcript_file = session_dir / "dialog" / "transcriptions" / f"{dialog}.txt"
    try:
        transcripts, repeats = _read_transcripts(transcript_file)
        unusable = None
    except DataError as err:
        transcripts, repeats = {}, {}
        unusable = "transcription file missing" if err.problem == "file missing" else err.problem
    wav_dir = session_dir / "sentences" / "wav" / dialog
    utterances = []
    for ev in kept:
        problem = _transcript_problem(ev.id, transcripts, repeats, unusable)
        if problem:
            _fail_or_skip(result, skip_bad, transcript_file, problem)
            continue
        wav_path = wav_dir / f"{ev.id}.wav"
        duration = _wav_duration(wav_path, ev, result, skip_bad)
        if duration is None:
            continue
        turn = _TURN.match(ev.id.rsplit("_", 1)[1])  # _read_evaluations checked the id's shape
        speaker = f"Ses{session:02d}{turn.group('speaker')}"
        utterances.append(
            Utterance(
                id=ev.id,
                session=session,
                speaker=speaker,
                gender=turn.group("speaker"),
                mode="improvised" if "impro" in dialog else "scripted",
                label=LABEL_MAP[ev.raw_label],
                raw_label=ev.raw_label,
                transcript=transcripts[ev.id][0],
                wav_path=str(wav_path),
                duration=duration,
            )
        )
    return utterances


def _read_evaluations(
    session: int, dialog: str, emo_file: Path, skip_bad: bool, result: ParseResult
) -> list[_Evaluation]:
    if "impro" not in dialog and "script" not in dialog:
        _fail_or_skip(result, skip_bad, emo_file, "dialog name has neither 'impro' nor 'script' in it")
        return []
    if not dialog.startswith(f"Ses{session:02d}"):
        _fail_or_skip(result, skip_bad, emo_file, f"dialog {dialog} does not belong to Session{session}")
        return []
    try:
        lines = _read_lines(emo_file)
    except DataError as err:
        _fail_or_skip(result, skip_bad, err.path, err.problem)
        return []
    evaluations = []
    first_seen = {}  # id -> line number; ids carry their dialog's name, so repeats can only be in this file
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("%"):
            continue
        m = _CATEGORY_LINE.match(stripped)
        if m is None:
            # Evaluator lines ("C-E2:", "A-F1:") name no utterance; anything else that does is a broken one.
            if stripped.startswith("[") or _MENTIONS_ID.search(stripped):
                _fail_or_skip(
                    result,
                    skip_bad,
                    emo_file,
                    f"line {number}: malformed category line {stripped[:80]!r} "
                    "(expected '[START - END]<tab>UTT_ID<tab>LABEL<tab>[V, A, D]')",
                )
            continue
        utt_id = m.group("id")
        head, _, last = utt_id.rpartition("_")
        problem = None
        if head != dialog or _TURN.match(last) is None:
            problem = f"utterance id {utt_id!r} is not of the form {dialog}_F000 / {dialog}_M000"
        elif utt_id in first_seen:
            problem = f"utterance id {utt_id!r} already evaluated at line {first_seen[utt_id]}"
        if problem:
            _fail_or_skip(result, skip_bad, emo_file, f"line {number}: {problem}")
            continue
        first_seen[utt_id] = number
        evaluations.append(_Evaluation(utt_id, m.group("label"), emo_file, number))
    return evaluations


def _read_transcripts(path: Path) -> tuple[dict[str, tuple[str, int]], dict[str, list[int]]]:
    """id -> (text, line number), and id -> the line numbers of an id given different texts (module docstring)."""
    transcripts: dict[str, tuple[str, int]] = {}
    repeats: dict[str, list[int]] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        m = _TRANSCRIPT_LINE.match(line.strip())
        if m is None:
            continue
        utt_id, text = m.group("id"), m.group("text").strip()
        if utt_id not in transcripts:
            transcripts[utt_id] = (text, number)
        elif transcripts[utt_id][0] != text:
            repeats.setdefault(utt_id, [transcripts[utt_id][1]]).append(number)
    return transcripts, repeats


def _transcript_problem(utt_id: str, transcripts: dict, repeats: dict, unusable: str | None) -> str | None:
    """Why ``utt_id`` has no usable transcript (the file is unusable, its line is missing or repeated), or None."""
    if unusable:
        return f"{unusable} (needed for {utt_id})"
    if utt_id in repeats:
        lines = " and ".join(map(str, repeats[utt_id]))
        return f"lines {lines} give {utt_id} different transcripts; keep the right one"
    return None if utt_id in transcripts else f"no transcript line for {utt_id}"


def _wav_duration(wav_path: Path, ev: _Evaluation, result: ParseResult, skip_bad: bool) -> float | None:
    problem = file_problem(wav_path)  # soundfile would say "System error" for most of these, or block on a FIFO
    if problem:
        if problem == "missing":
            problem = f"wav missing (listed at {ev.source.name} line {ev.line_number})"
        _fail_or_skip(result, skip_bad, wav_path, problem)
        return None
    try:
        info = soundfile.info(str(wav_path))
    except RuntimeError as e:  # soundfile.LibsndfileError and friends
        _fail_or_skip(result, skip_bad, wav_path, f"corrupt wav, cannot read its header ({e})")
        return None
    if info.frames <= 0 or info.samplerate <= 0:
        _fail_or_skip(result, skip_bad, wav_path, f"wav header reports {info.frames} frames at {info.samplerate} Hz")
        return None
    return info.frames / info.samplerate
