"""The IEMOCAP parser against independently computed truths: raw-text scans, hand-written corpora, decoded audio."""

from __future__ import annotations

import collections
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from ser_platform.data.errors import DataError
from ser_platform.data.iemocap import (
    CLASSES,
    DROPPED_LABELS,
    LABEL_MAP,
    PAPER_COUNTS,
    ParseResult,
    Utterance,
    parse_iemocap,
)

# The paper's class definition (§3.1), written out here rather than imported.
MERGE = {"ang": "angry", "hap": "happy", "exc": "happy", "neu": "neutral", "sad": "sad"}
CATEGORY = re.compile(r"^\[[\d.]+ - [\d.]+\]\t(\S+)\t(\S+)\t\[")


def raw_evaluations(root: Path) -> dict[str, tuple[str, Path]]:
    """id -> (raw label, EmoEvaluation file), scanned straight from the top-level EmoEvaluation files."""
    found = {}
    for path in sorted(root.glob("Session*/dialog/EmoEvaluation/*.txt")):
        for line in path.read_text().splitlines():
            if m := CATEGORY.match(line):
                found[m.group(1)] = (m.group(2), path)
    return found


def transcript_lines(root: Path) -> dict[str, str]:
    texts = {}
    for path in root.glob("Session*/dialog/transcriptions/*.txt"):
        for line in path.read_text().splitlines():
            if line.startswith("Ses") and "]: " in line:
                texts[line.split(" ", 1)[0]] = line.split("]: ", 1)[1]
    return texts


@pytest.fixture(scope="module")
def parsed(synthetic_corpus: Path) -> ParseResult:
    return parse_iemocap(synthetic_corpus)


# ---- constants -------------------------------------------------------------------------------------------------


def test_label_constants_follow_the_paper():
    assert CLASSES == ("angry", "happy", "neutral", "sad")
    assert LABEL_MAP == MERGE
    assert set(DROPPED_LABELS) == {"fru", "sur", "fea", "dis", "oth", "xxx"}
    assert not set(DROPPED_LABELS) & set(LABEL_MAP)
    assert sum(PAPER_COUNTS.values()) == 5531
    assert PAPER_COUNTS == {"happy": 1636, "sad": 1084, "angry": 1103, "neutral": 1708}


# ---- the synthetic corpus through the real parser ----------------------------------------------------------------


def test_counts_and_drops_match_a_raw_scan(synthetic_corpus, parsed):
    truth = raw_evaluations(synthetic_corpus)
    expected = collections.Counter((int(i[3:5]), MERGE[raw]) for i, (raw, _) in truth.items() if raw in MERGE)
    got = collections.Counter((u.session, u.label) for u in parsed.utterances)
    assert got == expected
    assert parsed.dropped == collections.Counter(raw for raw, _ in truth.values() if raw not in MERGE)
    assert parsed.counts() == {c: sum(n for (_, label), n in expected.items() if label == c) for c in CLASSES}
    assert parsed.counts() == {"angry": 25, "happy": 35, "neutral": 35, "sad": 25}
    assert len(parsed.utterances) + sum(parsed.dropped.values()) == len(truth)
    assert {"fru", "xxx"} <= set(parsed.dropped)
    assert parsed.skipped == []


def test_utterance_fields(synthetic_corpus, parsed):
    truth = raw_evaluations(synthetic_corpus)
    texts = transcript_lines(synthetic_corpus)
    assert [u.id for u in parsed.utterances] == sorted(u.id for u in parsed.utterances)
    for u in parsed.utterances:
        dialog, turn = u.id.rsplit("_", 1)
        assert u.session == int(u.id[3:5])
        assert u.speaker == f"Ses{u.id[3:5]}{turn[0]}"
        assert u.gender == turn[0]
        assert u.mode == ("improvised" if "_impro" in dialog else "scripted")
        assert u.raw_label == truth[u.id][0] and u.label == MERGE[u.raw_label]
        assert u.transcript == texts[u.id]
        wav_dir = synthetic_corpus / f"Session{u.session}" / "sentences" / "wav" / dialog
        assert Path(u.wav_path) == wav_dir / f"{u.id}.wav"
        audio, rate = soundfile.read(u.wav_path)  # decode: an independent duration from the header's
        assert u.duration == pytest.approx(len(audio) / rate, abs=1e-9)


def test_speaker_is_the_turn_letter_not_the_dialog_letter(parsed):
    # In Ses01F_impro01 the male actor speaks the M turns: the dialog's letter is who wore the markers.
    crossed = [u for u in parsed.utterances if u.id[5] != u.gender]
    assert crossed, "the fixture should hold turns by the actor not wearing markers"
    for session in range(1, 6):
        mine = [u for u in parsed.utterances if u.session == session]
        assert {u.speaker for u in mine} == {f"Ses{session:02d}F", f"Ses{session:02d}M"}
        assert {u.mode for u in mine} == {"improvised", "scripted"}


def test_ignores_evaluator_lines_unevaluated_turns_and_decoy_files(synthetic_corpus, parsed):
    ids = {u.id for u in parsed.utterances}
    # The fixture really has what must be ignored, or this test would prove nothing.
    assert list(synthetic_corpus.glob("Session*/dialog/EmoEvaluation/Categorical/*.txt"))
    assert list(synthetic_corpus.glob("Session*/dialog/EmoEvaluation/Attribute/*.txt"))
    assert list(synthetic_corpus.glob("Session*/dialog/EmoEvaluation/Self-evaluation/*.txt"))
    transcripts = "\n".join(p.read_text() for p in synthetic_corpus.glob("Session*/dialog/transcriptions/*.txt"))
    unevaluated = re.findall(r"^(Ses\S+XX\d) \[", transcripts, flags=re.M)
    assert unevaluated and not ids & set(unevaluated)
    assert re.search(r"^[FM]: \[BREATHING\]$", transcripts, flags=re.M)
    emo = "\n".join(p.read_text() for p in synthetic_corpus.glob("Session*/dialog/EmoEvaluation/*.txt"))
    assert re.search(r"^C-E\d:\t", emo, flags=re.M) and re.search(r"^A-[FM]1:\tval ", emo, flags=re.M)


def test_any_subset_of_sessions(synthetic_corpus, parsed, tmp_path):
    for n in (2, 4):
        shutil.copytree(synthetic_corpus / f"Session{n}", tmp_path / f"Session{n}")
    (tmp_path / "Documentation").mkdir()  # other folders of the release are ignored
    subset = parse_iemocap(tmp_path)
    assert [u.id for u in subset.utterances] == [u.id for u in parsed.utterances if u.session in (2, 4)]


def test_progress_bar_changes_nothing(synthetic_corpus, parsed):
    assert parse_iemocap(synthetic_corpus, progress=True).utterances == parsed.utterances


# ---- hand-written corpora in the release's exact formats ---------------------------------------------------------

HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]"
EVALUATOR_LINES = [
    "C-E2:\tNeutral;\t()",
    "C-E3:\tNeutral;\t()",
    "C-F1:\tNeutral;\t()",
    "A-E3:\tval 3; act 2; dom  2;\t()",
    "A-F1:\tval 2; act 2; dom  2;\t()",
]


def tiny_wav(frames: int = 1600, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(frames, dtype=np.int16), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_corpus(root: Path, entries, *, newline: str = "\n") -> None:
    """entries: (utterance id, raw label, transcript) in the release's layout; wavs only for kept labels."""
    wav = tiny_wav()
    dialogs = collections.defaultdict(list)
    for utt_id, raw, text in entries:
        dialogs[utt_id.rsplit("_", 1)[0]].append((utt_id, raw, text))
    for dialog, turns in dialogs.items():
        session = root / f"Session{int(dialog[3:5])}"
        emo = [HEADER, ""]
        trans = []
        for k, (utt_id, raw, text) in enumerate(turns):
            start, end = 2.0 * k + 1.5, 2.0 * k + 2.5
            emo += [f"[{start:.4f} - {end:.4f}]\t{utt_id}\t{raw}\t[2.5000, 2.5000, 2.5000]", *EVALUATOR_LINES, ""]
            trans.append(f"{utt_id} [{start:08.4f}-{end:08.4f}]: {text}")
            if raw in MERGE:
                (session / "sentences" / "wav" / dialog).mkdir(parents=True, exist_ok=True)
                (session / "sentences" / "wav" / dialog / f"{utt_id}.wav").write_bytes(wav)
        for folder, lines in (("EmoEvaluation", emo), ("transcriptions", trans)):
            (session / "dialog" / folder).mkdir(parents=True, exist_ok=True)
            (session / "dialog" / folder / f"{dialog}.txt").write_bytes((newline.join(lines) + newline).encode())


@pytest.mark.slow
def test_real_label_distribution_gives_the_papers_5531(tmp_path):
    # IEMOCAP's 10,039 evaluated turns by raw label (the release's EmoEvaluation files).
    real = {"neu": 1708, "fru": 1849, "ang": 1103, "sad": 1084, "exc": 1041, "hap": 595,
            "sur": 107, "fea": 40, "oth": 3, "dis": 2, "xxx": 2507}  # fmt: skip
    assert sum(real.values()) == 10039
    labels = [raw for raw, n in sorted(real.items()) for _ in range(n)]
    np.random.default_rng(0).shuffle(labels)
    entries = []
    for i, raw in enumerate(labels):
        session = i % 5 + 1
        dialog = f"Ses{session:02d}{'FM'[i // 5 % 2]}_{'impro' if i // 10 % 2 else 'script'}{i // 400 % 9 + 1:02d}"
        entries.append((f"{dialog}_{'MF'[i % 2]}{i:05d}", raw, "Excuse me."))
    write_corpus(tmp_path, entries)
    result = parse_iemocap(tmp_path)
    assert result.counts() == PAPER_COUNTS
    assert len(result.utterances) == 5531
    assert result.dropped == {raw: n for raw, n in real.items() if raw in DROPPED_LABELS}
    happy = collections.Counter(u.raw_label for u in result.utterances if u.label == "happy")
    assert happy == {"exc": 1041, "hap": 595}


def test_handwritten_dialog_in_the_release_format(tmp_path):
    entries = [
        ("Ses01F_impro01_F000", "neu", "Excuse me."),
        ("Ses01F_impro01_M000", "exc", "[LAUGHTER] Yes: at 5:30 [today], see you!"),
        ("Ses01F_impro01_F001", "fru", "Ugh."),
        ("Ses01F_impro01_M001", "xxx", "What?"),
        ("Ses01F_impro01_F002", "hap", "Great."),
        ("Ses01M_script02_2_F000", "ang", "Shut up."),
        ("Ses01M_script02_2_M000", "sad", "I'm sorry."),
        ("Ses01M_script02_2_M001", "sur", "Oh!"),
    ]
    write_corpus(tmp_path, entries, newline="\r\n")  # line endings of files edited on Windows
    trans = tmp_path / "Session1/dialog/transcriptions/Ses01F_impro01.txt"
    with trans.open("a") as f:  # lines that are not evaluated turns
        f.write("Ses01F_impro01_MXX0 [010.0000-011.0000]: [BREATHING]\nM: [BREATHING]\n")
    result = parse_iemocap(tmp_path)
    by_id = {u.id: u for u in result.utterances}
    assert [u.id for u in result.utterances] == sorted(
        ["Ses01F_impro01_F000", "Ses01F_impro01_M000", "Ses01F_impro01_F002", "Ses01M_script02_2_F000",
         "Ses01M_script02_2_M000"]
    )  # fmt: skip
    assert result.counts() == {"angry": 1, "happy": 2, "neutral": 1, "sad": 1}
    assert result.dropped == {"fru": 1, "xxx": 1, "sur": 1}
    assert by_id["Ses01F_impro01_M000"].transcript == "[LAUGHTER] Yes: at 5:30 [today], see you!"
    assert by_id["Ses01F_impro01_M000"] == Utterance(
        id="Ses01F_impro01_M000", session=1, speaker="Ses01M", gender="M", mode="improvised", label="happy",
        raw_label="exc", transcript="[LAUGHTER] Yes: at 5:30 [today], see you!",
        wav_path=str(tmp_path / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M000.wav"), duration=0.1,
    )  # fmt: skip
    assert by_id["Ses01M_script02_2_F000"].speaker == "Ses01F"
    assert by_id["Ses01M_script02_2_F000"].mode == "scripted"


def test_hidden_files_beside_dialogs_are_ignored(tmp_path):
    write_corpus(tmp_path, [("Ses02M_impro03_F000", "sad", "Bye.")])
    # A macOS resource fork, as copies of the release made on a Mac carry: binary, so it may hold "\n[".
    fork = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\x00\x00\x00\t\n[\x00\x00\x0e\xb0ATTR"
    (tmp_path / "Session2/dialog/EmoEvaluation/._Ses02M_impro03.txt").write_bytes(fork)
    assert [u.id for u in parse_iemocap(tmp_path).utterances] == ["Ses02M_impro03_F000"]


# ---- bad input: a DataError naming the file, or skipped and recorded -----------------------------------------------


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        parse_iemocap(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    for skip_bad in (False, True):  # nothing to parse at all is an error even when skipping bad inputs
        with pytest.raises(DataError, match="no Session1..Session5"):
            parse_iemocap(tmp_path, skip_bad=skip_bad)
    (tmp_path / "IEMOCAP_full_release" / "Session1").mkdir(parents=True)
    with pytest.raises(DataError, match="did you mean .*IEMOCAP_full_release"):
        parse_iemocap(tmp_path)


def test_session_without_evaluations(synthetic_corpus, tmp_path):
    shutil.copytree(synthetic_corpus / "Session1", tmp_path / "Session1")
    no_evaluations = shutil.ignore_patterns("EmoEvaluation")
    shutil.copytree(synthetic_corpus / "Session2", tmp_path / "Session2", ignore=no_evaluations)
    with pytest.raises(DataError, match=r"Session2/dialog/EmoEvaluation: folder missing"):
        parse_iemocap(tmp_path)
    result = parse_iemocap(tmp_path, skip_bad=True)
    assert {u.session for u in result.utterances} == {1}
    assert [Path(s.path).name for s in result.skipped] == ["EmoEvaluation"]


def test_session_folder_holding_another_sessions_dialogs(synthetic_corpus, tmp_path):
    shutil.copytree(synthetic_corpus / "Session1", tmp_path / "Session3")  # a misnamed copy
    shutil.copytree(synthetic_corpus / "Session2", tmp_path / "Session2")
    first = sorted((tmp_path / "Session3/dialog/EmoEvaluation").glob("*.txt"))[0]
    with pytest.raises(DataError, match=f"{first.name}: dialog {first.stem} does not belong to Session3"):
        parse_iemocap(tmp_path)
    result = parse_iemocap(tmp_path, skip_bad=True)
    assert {u.session for u in result.utterances} == {2}
    assert len(result.skipped) == 4 and all("does not belong to Session3" in s.problem for s in result.skipped)


@pytest.fixture
def session1(synthetic_corpus, parsed, tmp_path) -> tuple[Path, list[Utterance]]:
    """A private copy of Session1 and its parsed (kept) utterances, ready to be damaged."""
    shutil.copytree(synthetic_corpus / "Session1", tmp_path / "Session1")
    return tmp_path, [u for u in parsed.utterances if u.session == 1]


def victim(root: Path, kept: list[Utterance], index: int = 3) -> tuple[Utterance, str, Path, Path, Path]:
    """One kept utterance of the copy, with its dialog, EmoEvaluation file, transcription file and wav."""
    u = kept[index]
    dialog = u.id.rsplit("_", 1)[0]
    emo = root / "Session1/dialog/EmoEvaluation" / f"{dialog}.txt"
    trans = root / "Session1/dialog/transcriptions" / f"{dialog}.txt"
    wav = root / "Session1/sentences/wav" / dialog / f"{u.id}.wav"
    return u, dialog, emo, trans, wav


def edit_line(path: Path, needle: str, change) -> int:
    """Replace the first line holding ``needle`` by ``change(line)`` (None deletes it); return its line number."""
    lines = path.read_text().split("\n")
    index = next(i for i, line in enumerate(lines) if needle in line)
    changed = change(lines[index])
    lines[index : index + 1] = [] if changed is None else [changed]
    path.write_text("\n".join(lines))
    return index + 1


def assert_strict_and_skipping(root, kept, lost_ids, file_name, message):
    """Strict parsing raises naming ``file_name``; skip_bad drops exactly ``lost_ids`` and records why."""
    with pytest.raises(DataError) as err:
        parse_iemocap(root)
    assert file_name in str(err.value) and re.search(message, str(err.value)), str(err.value)
    result = parse_iemocap(root, skip_bad=True)
    assert [u.id for u in result.utterances] == [u.id for u in kept if u.id not in lost_ids]
    assert len(result.skipped) == len(lost_ids)
    assert all(file_name in s.path and re.search(message, s.problem) for s in result.skipped), result.skipped
    return err.value


def test_missing_wav(session1):
    root, kept = session1
    u, _, _, _, wav = victim(root, kept)
    wav.unlink()
    assert_strict_and_skipping(root, kept, {u.id}, wav.name, "wav missing")


def test_corrupt_wav(session1):
    root, kept = session1
    u, _, _, _, wav = victim(root, kept)
    wav.write_bytes(b"RIFF\x00\x00garbage, not a wav header")
    assert_strict_and_skipping(root, kept, {u.id}, wav.name, "corrupt wav")


def test_wav_with_zero_frames(session1):
    root, kept = session1
    u, _, _, _, wav = victim(root, kept)
    soundfile.write(wav, np.zeros(0, dtype=np.int16), 16000, subtype="PCM_16")
    assert_strict_and_skipping(root, kept, {u.id}, wav.name, "0 frames")


def test_missing_transcript_line(session1):
    root, kept = session1
    u, _, _, trans, _ = victim(root, kept)
    edit_line(trans, f"{u.id} [", lambda line: None)
    error = assert_strict_and_skipping(root, kept, {u.id}, trans.name, f"no transcript line for {u.id}")
    assert error.path == str(trans)


def test_missing_transcription_file(session1):
    root, kept = session1
    u, dialog, _, trans, _ = victim(root, kept)
    trans.unlink()
    lost = {k.id for k in kept if k.id.startswith(dialog + "_")}
    assert_strict_and_skipping(root, kept, lost, trans.name, "transcription file missing")


def test_unknown_label_names_file_and_line(session1):
    root, kept = session1
    u, _, emo, _, _ = victim(root, kept)
    number = edit_line(emo, f"\t{u.id}\t", lambda line: line.replace(f"\t{u.raw_label}\t", "\tbor\t"))
    error = assert_strict_and_skipping(root, kept, {u.id}, emo.name, f"line {number}: unknown label 'bor'")
    assert u.id in str(error)


@pytest.mark.parametrize(
    "damage",
    [
        lambda line: line.replace(" - ", " ", 1),  # time range broken
        lambda line: line.split("\t[")[0],  # V, A, D missing
        lambda line: line[1:],  # opening bracket lost
    ],
    ids=["time-range", "no-vad", "no-bracket"],
)
def test_malformed_category_line(session1, damage):
    root, kept = session1
    u, _, emo, _, _ = victim(root, kept)
    number = edit_line(emo, f"\t{u.id}\t", damage)
    assert_strict_and_skipping(root, kept, {u.id}, emo.name, f"line {number}: malformed category line")


def test_utterance_filed_under_the_wrong_dialog(session1):
    root, kept = session1
    u, dialog, emo, _, _ = victim(root, kept)
    edit_line(emo, f"\t{u.id}\t", lambda line: line.replace(u.id, u.id.replace(dialog, "Ses01F_impro99")))
    assert_strict_and_skipping(root, kept, {u.id}, emo.name, "is not of the form")


def test_utterance_evaluated_twice(session1):
    root, kept = session1
    u, _, emo, _, _ = victim(root, kept)
    first = edit_line(emo, f"\t{u.id}\t", lambda line: line)
    category = emo.read_text().split("\n")[first - 1]
    with emo.open("a") as f:
        f.write(category + "\n")
    repeat = len(emo.read_text().split("\n")) - 1
    with pytest.raises(DataError, match=f"{emo.name}: line {repeat}: .*already evaluated at line {first}"):
        parse_iemocap(root)
    result = parse_iemocap(root, skip_bad=True)  # the first evaluation stands, the repeat is skipped
    assert [x.id for x in result.utterances] == [x.id for x in kept]
    assert [s.path for s in result.skipped] == [str(emo)]


def test_text_that_is_not_utf8_is_named_not_guessed(session1):
    root, kept = session1
    u, dialog, _, trans, _ = victim(root, kept)
    trans.write_bytes(trans.read_bytes() + f"{u.id}X [001.0000-002.0000]: café\n".encode("latin-1"))
    lines = trans.read_bytes().count(b"\n")
    lost = {k.id for k in kept if k.id.startswith(dialog + "_")}  # the dialog's transcripts cannot be trusted
    assert_strict_and_skipping(root, kept, lost, trans.name, rf"line {lines}: not UTF-8 text \(byte 0xe9 at offset")
    trans.write_bytes(trans.read_bytes().replace("é".encode("latin-1"), "é".encode("utf-8")))
    assert len(parse_iemocap(root).utterances) == len(kept)  # the same text in UTF-8 is fine


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_id(session1):
    root, kept = session1
    _, _, emo, trans, _ = victim(root, kept)
    for path in (emo, trans):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [u.transcript for u in parse_iemocap(root).utterances] == [u.transcript for u in kept]


def test_an_id_with_two_different_transcripts_is_named_with_both_lines(session1):
    root, kept = session1
    u, _, _, trans, _ = victim(root, kept)
    first = edit_line(trans, f"{u.id} [", lambda line: line)
    original = trans.read_text().split("\n")[first - 1]
    trans.write_text(trans.read_text() + original + "\n")  # word for word: unambiguous, read once
    assert [x.transcript for x in parse_iemocap(root).utterances] == [x.transcript for x in kept]
    trans.write_text(trans.read_text() + original.split("]:")[0] + "]: Something else.\n")
    repeat = len(trans.read_text().split("\n")) - 1
    assert_strict_and_skipping(root, kept, {u.id}, trans.name,
                               f"lines {first} and {repeat} give {u.id} different transcripts")


def test_a_fifo_in_place_of_a_wav_is_named_never_opened(session1):
    root, kept = session1
    u, _, _, _, wav = victim(root, kept)
    wav.unlink()
    os.mkfifo(wav)  # opening it for reading would wait for a writer forever
    assert_strict_and_skipping(root, kept, {u.id}, wav.name, "is a FIFO, not a file")
