"""The synthetic corpus: IEMOCAP's layout and line formats, safe writing, determinism, and a learnable signal.

The signal checks measure the audio and text the generator wrote (librosa's YIN, RMS, a bag of words) and
never read its parameters back.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict
from sklearn.preprocessing import StandardScaler

from ser_platform.data import synthetic
from ser_platform.data.errors import DataError
from ser_platform.data.iemocap import CLASSES, PAPER_COUNTS, parse_iemocap
from ser_platform.data.synthetic import write_synthetic_corpus

# The release's exact line formats.
CATEGORY_LINE = re.compile(
    r"^\[(\d+\.\d{4}) - (\d+\.\d{4})\]\t(Ses\d\d[FM]_\S+_[FM]\d{3})\t([a-z]{3})\t\[\d\.\d{4}, \d\.\d{4}, \d\.\d{4}\]$"
)
EVALUATOR_LINE = re.compile(
    r"^(C-[EFM]\d:\t([A-Z][a-z]+; )*[A-Z][a-z]+;|A-[EFM]\d:\tval \d; act \d; dom  \d;)\t\(.*\)$"
)
TRANSCRIPT_LINE = re.compile(
    r"^(Ses\d\d[FM]_\S+_[FM](?:\d{3}|XX\d)) \[(\d{3}\.\d{4})-(\d{3}\.\d{4})\]: (.+)$"
)
NO_ID_LINE = re.compile(r"^[FM]: \[BREATHING\]$")
DIALOG = re.compile(r"^Ses0([1-5])[FM]_(impro0\d[ab]?|script0\d_\d)$")


def digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory) -> Path:
    """The corpus at its defaults, as the demo gets it."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("default") / "IEMOCAP_full_release")


# ---- layout and formats ------------------------------------------------------------------------------------------


def test_layout_and_line_formats(synthetic_corpus):
    assert sorted(p.name for p in synthetic_corpus.iterdir() if p.is_dir()) == [f"Session{n}" for n in range(1, 6)]
    evaluated = 0
    for n in range(1, 6):
        session = synthetic_corpus / f"Session{n}"
        emo_files = sorted((session / "dialog" / "EmoEvaluation").glob("*.txt"))
        dialogs = [p.stem for p in emo_files]
        assert all(DIALOG.match(d) and d[4] == str(n) for d in dialogs), dialogs
        assert {"impro", "script"} == {re.sub(r"[\d_ab]", "", d.split("_", 1)[1]) for d in dialogs}
        assert sorted(p.stem for p in (session / "dialog" / "transcriptions").glob("*.txt")) == dialogs
        assert sorted(p.name for p in (session / "sentences" / "wav").iterdir()) == dialogs
        for sub in ("Categorical", "Attribute", "Self-evaluation"):
            assert list((session / "dialog" / "EmoEvaluation" / sub).glob("*.txt"))
        for emo in emo_files:
            lines = emo.read_text().split("\n")
            assert lines[:2] == ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            times = {}
            for line in lines[2:]:
                if m := CATEGORY_LINE.match(line):
                    assert m.group(3).startswith(emo.stem + "_")
                    times[m.group(3)] = (m.group(1), m.group(2))
                else:
                    assert line == "" or EVALUATOR_LINE.match(line), repr(line)
            transcribed = {}
            for line in (session / "dialog" / "transcriptions" / emo.name).read_text().splitlines():
                m = TRANSCRIPT_LINE.match(line)
                assert m or NO_ID_LINE.match(line), repr(line)
                if m and "XX" not in m.group(1):
                    transcribed[m.group(1)] = m.group(2, 3)
            assert transcribed.keys() == times.keys()
            for utt_id, (start, end) in times.items():
                info = soundfile.info(str(session / "sentences" / "wav" / emo.stem / f"{utt_id}.wav"))
                assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
                assert 1.0 <= info.duration <= 3.0
                assert float(end) - float(start) == pytest.approx(info.duration, abs=2e-4)
                assert tuple(float(t) for t in transcribed[utt_id]) == (float(start), float(end))
            evaluated += len(times)
    assert evaluated == 5 * (24 + 6)  # kept plus a quarter as many dropped, per session


@pytest.mark.slow
def test_default_composition(default_corpus):
    result = parse_iemocap(default_corpus)
    counts = result.counts()
    assert sum(counts.values()) == 5 * 60
    total = sum(PAPER_COUNTS.values())
    for label in CLASSES:  # IEMOCAP's class proportions
        assert counts[label] / 300 == pytest.approx(PAPER_COUNTS[label] / total, abs=0.01)
    assert collections.Counter(u.session for u in result.utterances) == {n: 60 for n in range(1, 6)}
    assert sum(result.dropped.values()) == 5 * 15
    assert {"xxx", "fru", "sur"} <= set(result.dropped)
    happy = collections.Counter(u.raw_label for u in result.utterances if u.label == "happy")
    assert happy["exc"] > happy["hap"] > 0  # exc outnumbers hap, as in IEMOCAP
    for n in range(1, 6):
        mine = [u for u in result.utterances if u.session == n]
        assert {u.gender for u in mine} == {"F", "M"}
        assert {u.mode for u in mine} == {"improvised", "scripted"}
    # Scripts are shared: the same scripted line is performed in more than one session.
    sessions_per_line = collections.defaultdict(set)
    for u in result.utterances:
        if u.mode == "scripted":
            sessions_per_line[u.transcript].add(u.session)
    assert max(len(s) for s in sessions_per_line.values()) >= 2


# ---- writing safely and reproducibly -----------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = digest(write_synthetic_corpus(tmp_path / "a", utterances_per_session=8, seed=3))
    b = digest(write_synthetic_corpus(tmp_path / "b", utterances_per_session=8, seed=3))
    c = digest(write_synthetic_corpus(tmp_path / "c", utterances_per_session=8, seed=4))
    assert len(a) == len(c) > 5 * 10 and a == b
    wavs_a = sorted(v for k, v in a.items() if k.endswith(".wav"))
    wavs_c = sorted(v for k, v in c.items() if k.endswith(".wav"))
    assert not set(wavs_a) & set(wavs_c)  # another seed: not one waveform in common


def test_refuses_to_clobber_and_replaces_only_its_own_corpus(tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        write_synthetic_corpus(out, utterances_per_session=8)
    # Not a corpus written here (no marker): refused even with overwrite, the folder untouched.
    with pytest.raises(DataError, match="not a synthetic corpus written by `ser synth` .*remove it yourself"):
        write_synthetic_corpus(out, utterances_per_session=8, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    out.joinpath("precious.txt").unlink()
    first = write_synthetic_corpus(out, utterances_per_session=8, seed=1)  # an empty folder is a fine target
    assert synthetic.is_synthetic_corpus(first) and digest(first) != {}
    root = write_synthetic_corpus(out, utterances_per_session=8, seed=2, overwrite=True)  # its own: replaced
    assert root == out and json.loads((out / synthetic.MARKER_FILE).read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temporary siblings, no lock left
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match="exists and is not a folder"):
        write_synthetic_corpus(tmp_path / "a_file", utterances_per_session=8, overwrite=True)


@pytest.mark.parametrize("existing", [False, True])
def test_a_crash_leaves_no_half_corpus(tmp_path, monkeypatch, existing):
    out = tmp_path / "corpus"
    if existing:
        write_synthetic_corpus(out, utterances_per_session=8, seed=5)
    before = digest(out) if existing else None
    real_write, calls = soundfile.write, []

    def failing_write(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 25:  # well into Session2
            raise OSError("disk full")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(synthetic.soundfile, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_corpus(out, utterances_per_session=8, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["corpus"] if existing else [])
    if existing:
        assert digest(out) == before


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="utterances_per_session=7"):
        write_synthetic_corpus(tmp_path / "x", utterances_per_session=7)
    with pytest.raises(ValueError, match="sample_rate=4000"):
        write_synthetic_corpus(tmp_path / "x", sample_rate=4000)
    assert not (tmp_path / "x").exists()


def test_other_sample_rate_and_quiet_progress(tmp_path, capsys):
    root = write_synthetic_corpus(tmp_path / "c", utterances_per_session=8, sample_rate=22050, progress=True)
    assert capsys.readouterr().out == ""  # the bar goes to stderr; nothing is printed
    rates = {soundfile.info(str(p)).samplerate for p in root.rglob("*.wav")}
    assert rates == {22050}
    assert len(parse_iemocap(root).utterances) == 40


# ---- the emotion is in the signal, and in both modalities ---------------------------------------------------------


@pytest.fixture(scope="module")
def measured(default_corpus):
    """Per kept utterance: label index, session, transcript and prosodic measurements, speaker-normalised."""
    utterances = parse_iemocap(default_corpus).utterances
    rows = []
    for u in utterances:
        audio, rate = soundfile.read(u.wav_path, dtype="float32")
        rms = librosa.feature.rms(y=audio, frame_length=1024, hop_length=256)[0]
        f0 = librosa.yin(audio, fmin=60, fmax=500, sr=rate, frame_length=1024, hop_length=256)
        voiced = f0[(rms > 0.3 * rms.max())[: len(f0)]]
        envelope = rms - rms.mean()  # syllable rate: the strongest amplitude modulation between 1.5 and 9 Hz
        spectrum, freqs = np.abs(np.fft.rfft(envelope, 512)), np.fft.rfftfreq(512, 256 / rate)
        band = (freqs > 1.5) & (freqs < 9)
        rows.append([
            np.log(np.sqrt(np.mean(audio**2))),  # loudness
            np.log(np.median(voiced)),  # pitch level
            np.std(12 * np.log2(voiced)),  # pitch range, semitones
            freqs[band][np.argmax(spectrum[band])],  # syllable rate
        ])  # fmt: skip
    features = np.array(rows)
    speakers = np.array([u.speaker for u in utterances])
    raw_pitch = features[:, 1].copy()
    for s in set(speakers):  # actors differ in pitch and loudness: compare each with themself
        features[speakers == s, :2] -= features[speakers == s, :2].mean(0)
    return {
        "label": np.array([CLASSES.index(u.label) for u in utterances]),
        "session": np.array([u.session for u in utterances]),
        "gender": np.array([u.gender for u in utterances]),
        "text": [u.transcript for u in utterances],
        "features": features,
        "raw_pitch": raw_pitch,
    }


@pytest.mark.slow
def test_prosody_differs_by_emotion(measured):
    y, f = measured["label"], measured["features"]
    mean = {c: f[y == i].mean(0) for i, c in enumerate(CLASSES)}
    loudness, pitch, pitch_range, rate = (dict((c, mean[c][k]) for c in CLASSES) for k in range(4))
    assert loudness["angry"] > loudness["happy"] > loudness["neutral"] > loudness["sad"]
    assert min(pitch["angry"], pitch["happy"]) > pitch["neutral"] > pitch["sad"]
    assert pitch_range["happy"] == max(pitch_range.values()) and pitch_range["sad"] == min(pitch_range.values())
    assert rate["angry"] > rate["neutral"] > rate["sad"]
    female = np.median(measured["raw_pitch"][measured["gender"] == "F"])
    male = np.median(measured["raw_pitch"][measured["gender"] == "M"])
    assert np.exp(female - male) > 1.4  # female voices are higher


@pytest.mark.slow
def test_each_modality_misses_what_the_other_catches(measured):
    y, groups = measured["label"], measured["session"]
    audio = StandardScaler().fit_transform(measured["features"])
    words = CountVectorizer(token_pattern=r"[A-Za-z']+|[!?]").fit_transform(measured["text"]).toarray()
    cv = LeaveOneGroupOut()  # leave one session out, the paper's protocol

    def predict(x):
        return cross_val_predict(LogisticRegression(max_iter=5000), x, y, groups=groups, cv=cv)

    audio_right = predict(audio) == y
    text_right = predict(words) == y
    fused_right = predict(np.hstack([audio, words])) == y
    assert audio_right.mean() > 0.6 and text_right.mean() > 0.6  # both are learnable ...
    assert (audio_right & ~text_right).mean() > 0.08  # ... but each fails where the other succeeds
    assert (text_right & ~audio_right).mean() > 0.08
    assert fused_right.mean() > max(audio_right.mean(), text_right.mean()) + 0.03
