"""The Parquet dataset: round trip against the parser and soundfile, schema, features against librosa, summary,
part files, every bad-input case through the CLI, no clobbering, and atomic writes under a simulated crash."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import librosa
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import soundfile

from ser_platform.cli import main
from ser_platform.data import parquet
from ser_platform.data.atomic_folder import AtomicFolder
from ser_platform.data.errors import DataError
from ser_platform.data.iemocap import CLASSES, parse_iemocap
from ser_platform.data.parquet import format_summary, prepare_dataset, read_summary

CONTRACT_TYPES = {
    "id": pa.string(), "session": pa.int32(), "speaker": pa.string(), "gender": pa.string(), "mode": pa.string(),
    "label": pa.string(), "raw_label": pa.string(), "transcript": pa.string(), "audio": pa.list_(pa.float32()),
    "duration": pa.float32(),
}  # fmt: skip
FEATURE_TYPES = {"mfcc": pa.list_(pa.float32()), "spectrogram": pa.list_(pa.float32()), "num_frames": pa.int32()}


@pytest.fixture(scope="module")
def parsed(synthetic_corpus):
    return parse_iemocap(synthetic_corpus)


def _rows_by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


# --- round trip --------------------------------------------------------------------------------------------

def test_rows_and_counts_equal_the_parsers(featured_dataset, parsed):
    summary, _, table = featured_dataset
    assert table.num_rows == len(parsed.utterances) == summary["utterances"]
    assert collections.Counter(table.column("label").to_pylist()) == parsed.counts() == summary["classes"]
    rows = _rows_by_id(table)
    assert sorted(rows) == [u.id for u in parsed.utterances]
    for u in parsed.utterances:
        row = rows[u.id]
        for key in ("session", "speaker", "gender", "mode", "label", "raw_label", "transcript"):
            assert row[key] == getattr(u, key), (u.id, key)
    by_session = collections.Counter(str(u.session) for u in parsed.utterances)
    assert summary["sessions"] == dict(sorted(by_session.items()))
    assert summary["dropped_labels"] == dict(parsed.dropped) and summary["skipped"] == []


def test_audio_equals_soundfiles_decoding(featured_dataset, parsed):
    _, _, table = featured_dataset
    rows = _rows_by_id(table)
    for u in parsed.utterances[::7]:
        expected, rate = soundfile.read(u.wav_path, dtype="float32")
        assert rate == 16000
        audio = np.asarray(rows[u.id]["audio"], dtype=np.float32)
        np.testing.assert_array_equal(audio, expected)
        assert rows[u.id]["duration"] == pytest.approx(len(expected) / 16000, abs=1e-6)


def test_schema_types_are_the_contracts(featured_dataset):
    _, path, table = featured_dataset
    expected = {**CONTRACT_TYPES, **FEATURE_TYPES}
    for part in sorted(path.glob("part-*.parquet")):
        schema = pq.read_schema(part)
        assert {f.name: f.type for f in schema} == expected
    assert table.schema.names == list(expected)


def test_feature_columns_equal_librosa(featured_dataset, parsed):
    _, _, table = featured_dataset
    rows = _rows_by_id(table)
    for u in parsed.utterances[::11]:
        row = rows[u.id]
        audio = np.asarray(row["audio"], dtype=np.float32)
        frames = row["num_frames"]
        assert frames == 1 + len(audio) // 160
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mfcc = librosa.feature.mfcc(y=audio, sr=16000, n_mfcc=40, n_mels=40, htk=True, n_fft=640,
                                        win_length=640, hop_length=160, window="hamming").T
            power = np.abs(librosa.stft(audio, n_fft=640, hop_length=160, window="hamming")) ** 2
        spectrogram = librosa.power_to_db(power, top_db=80.0).T
        np.testing.assert_allclose(np.reshape(row["mfcc"], (frames, 40)), mfcc, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.reshape(row["spectrogram"], (frames, 321)), spectrogram, atol=1e-4, rtol=0)


def test_summary_in_metadata_equals_the_returned_one(featured_dataset):
    summary, path, table = featured_dataset
    assert read_summary(path) == summary
    assert read_summary(str(path)) == summary
    seconds = float(np.sum(pc.list_value_length(table.column("audio")).to_numpy())) / 16000
    assert summary["seconds"] == pytest.approx(seconds, abs=1e-3)
    assert summary["hours"] == pytest.approx(seconds / 3600, abs=1e-4)
    assert summary["features"] is True and summary["feature_params"]["n_mfcc"] == 40
    assert summary["columns"] == table.schema.names



def test_parts_are_bounded_and_hold_one_session_each(synthetic_corpus, tmp_path, parsed):
    out = tmp_path / "small-parts"
    summary = prepare_dataset(synthetic_corpus, out, rows_per_part=10)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == summary["parts"] >= len(parsed.utterances) // 10
    total = 0
    for part in parts:
        meta = pq.ParquetFile(part).metadata
        assert meta.num_rows <= 10
        assert all(meta.row_group(i).num_rows <= parquet.ROW_GROUP_ROWS for i in range(meta.num_row_groups))
        assert len(set(pq.read_table(part, columns=["session"]).column("session").to_pylist())) == 1
        total += meta.num_rows
    assert total == len(parsed.utterances)
    assert set(os.listdir(out)) == {p.name for p in parts} | {"_common_metadata"}


def test_part_byte_bound_closes_parts_early(synthetic_corpus, tmp_path):
    summary = prepare_dataset(synthetic_corpus, tmp_path / "ds", part_bytes=1)  # every row exceeds it
    assert summary["parts"] == summary["utterances"]


def test_format_summary_shows_the_counts(featured_dataset):
    summary, _, _ = featured_dataset
    text = format_summary(summary)
    for session, counts in summary["class_by_session"].items():
        assert f"{session:>7}  " + "  ".join(f"{counts[c]:>7}" for c in CLASSES) in text
    assert f"{summary['hours']:.3f} h" in text and "skipped inputs: 0" in text
    for label, count in summary["dropped_labels"].items():
        assert f"{label} {count}" in text


# --- the CLI -----------------------------------------------------------------------------------------------

def test_cli_json_prints_the_stored_summary(synthetic_corpus, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["prepare", "--source", str(synthetic_corpus), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == read_summary(out)
    assert printed["features"] is False and "mfcc" not in pq.read_schema(next(out.glob("part-*.parquet"))).names


def test_cli_text_output(synthetic_corpus, tmp_path, capsys):
    assert main(["prepare", "--source", str(synthetic_corpus), "--out", str(tmp_path / "ds")]) == 0
    assert capsys.readouterr().out.strip() == format_summary(read_summary(tmp_path / "ds"))


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.fixture
def session1(synthetic_corpus, tmp_path):
    """A private copy of Session1 only (30 utterances) to break, and its first kept utterance."""
    root = tmp_path / "corpus"
    shutil.copytree(synthetic_corpus / "Session1", root / "Session1")
    utterances = parse_iemocap(root).utterances
    return root, utterances


def _prepare(capsys, root: Path, out: Path, *extra: str) -> tuple[int, str, dict | None]:
    code = main(["prepare", "--source", str(root), "--out", str(out), "--json", *extra])
    captured = capsys.readouterr()
    return code, captured.err, json.loads(captured.out) if code == 0 else None


def _write_wav(path: Path, data: np.ndarray, rate: int, subtype: str = "PCM_16") -> None:
    soundfile.write(str(path), data, rate, subtype=subtype, format="WAV")


def _edit_line(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _stereo_different(path: Path) -> None:
    audio, rate = soundfile.read(str(path), dtype="float32")
    _write_wav(path, np.stack([audio, audio[::-1]], axis=1), rate)


def _nan_samples(path: Path) -> None:
    audio, rate = soundfile.read(str(path), dtype="float32")
    audio[10] = np.nan
    _write_wav(path, audio, rate, subtype="FLOAT")


def _zero_length(path: Path) -> None:
    _write_wav(path, np.zeros(0, np.float32), 16000)


# Each case: how to break the first utterance's files, and what the error must say. The file named is the
# wav unless the case says which other file.
BAD_INPUTS = {
    "wav listed but absent": (lambda u, root: Path(u.wav_path).unlink(), "wav", "wav missing"),
    "corrupt wav": (lambda u, root: Path(u.wav_path).write_bytes(b"not a wav at all" * 64), "wav", "corrupt"),
    "truncated wav": (lambda u, root: _truncate(Path(u.wav_path)), "wav", "truncated wav"),
    "zero-length audio": (lambda u, root: _zero_length(Path(u.wav_path)), "wav", "0 frames"),
    "stereo, different channels": (lambda u, root: _stereo_different(Path(u.wav_path)), "wav", "2 channels"),
    "non-finite samples": (lambda u, root: _nan_samples(Path(u.wav_path)), "wav", "non-finite"),
    "no transcript": (
        lambda u, root: _edit_line(_dialog_file(root, u, "transcriptions"), f"{u.id} [", "Sessnone ["),
        "transcriptions", "no transcript line",
    ),
    "unknown label": (
        lambda u, root: _edit_line(_dialog_file(root, u, "EmoEvaluation"), f"{u.id}\t{u.raw_label}", f"{u.id}\tbor"),
        "EmoEvaluation", "unknown label 'bor'",
    ),
}


def _dialog_file(root: Path, u, folder: str) -> Path:
    return root / f"Session{u.session}" / "dialog" / folder / f"{u.id.rsplit('_', 1)[0]}.txt"


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_errors_name_the_file_and_skip_bad_counts_it(case, session1, tmp_path, capsys):
    root, utterances = session1
    u = utterances[0]
    breaker, which, problem = BAD_INPUTS[case]
    breaker(u, root)
    named = u.wav_path if which == "wav" else str(_dialog_file(root, u, which))

    code, err, _ = _prepare(capsys, root, tmp_path / "ds")
    assert code == 2
    assert named in err and problem in err, err
    assert not (tmp_path / "ds").exists()

    code, err, summary = _prepare(capsys, root, tmp_path / "ds", "--skip-bad")
    assert code == 0, err
    assert summary["utterances"] == len(utterances) - 1
    assert [s["path"] for s in summary["skipped"]] == [named]
    assert problem in summary["skipped"][0]["problem"]
    assert u.id not in pq.read_table(tmp_path / "ds", columns=["id"]).column("id").to_pylist()


def test_missing_or_empty_source_is_named(tmp_path, capsys):
    code, err, _ = _prepare(capsys, tmp_path / "nowhere", tmp_path / "ds")
    assert code == 2 and str(tmp_path / "nowhere") in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, err, _ = _prepare(capsys, tmp_path / "empty", tmp_path / "ds")
    assert code == 2 and str(tmp_path / "empty") in err and "Session1..Session5" in err
    assert not (tmp_path / "ds").exists()


def test_everything_skipped_is_an_error_not_an_empty_dataset(session1, tmp_path, capsys):
    root, utterances = session1
    for u in utterances:
        Path(u.wav_path).write_bytes(b"junk" * 100)
    code, err, _ = _prepare(capsys, root, tmp_path / "ds", "--skip-bad")
    assert code == 2 and str(root) in err
    assert not (tmp_path / "ds").exists()


def test_other_sample_rates_are_resampled_and_counted(session1, tmp_path, capsys):
    root, utterances = session1
    u = utterances[0]
    rate, seconds = 44100, 1.5
    t = np.arange(int(rate * seconds)) / rate
    _write_wav(Path(u.wav_path), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)

    code, err, summary = _prepare(capsys, root, tmp_path / "ds")
    assert code == 0, err
    assert summary["resampled"] == {"44100": 1} and summary["skipped"] == []
    row = next(r for r in pq.read_table(tmp_path / "ds").to_pylist() if r["id"] == u.id)
    audio = np.asarray(row["audio"])
    assert abs(len(audio) - seconds * 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    assert np.fft.rfftfreq(len(audio), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=1)
    assert "resampled to 16 kHz: 1 from 44100 Hz" in format_summary(summary)


def test_stereo_with_identical_channels_is_downmixed_and_counted(session1, tmp_path, capsys):
    root, utterances = session1
    u = utterances[0]
    mono, rate = soundfile.read(u.wav_path, dtype="float32")
    _write_wav(Path(u.wav_path), np.stack([mono, mono], axis=1), rate)
    code, err, summary = _prepare(capsys, root, tmp_path / "ds")
    assert code == 0, err
    assert summary["downmixed"] == 1
    row = next(r for r in pq.read_table(tmp_path / "ds").to_pylist() if r["id"] == u.id)
    np.testing.assert_array_equal(np.asarray(row["audio"], np.float32), mono)


def test_output_inside_the_source_is_refused(session1, tmp_path):
    # (--out s3://... is supported: tests/e2e/test_object_storage.py)
    root, _ = session1
    with pytest.raises(DataError, match="inside the source"):
        prepare_dataset(root, root / "Session1" / "ds")


# --- never clobber, never half-write -----------------------------------------------------------------------

def test_existing_dataset_is_kept_without_overwrite_and_replaced_with_it(session1, tmp_path, capsys):
    root, utterances = session1
    out = tmp_path / "ds"
    first = prepare_dataset(root, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code, err, _ = _prepare(capsys, root, out)
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    Path(utterances[0].wav_path).unlink()
    code, err, summary = _prepare(capsys, root, out, "--overwrite", "--skip-bad")
    assert code == 0, err
    assert summary["utterances"] == first["utterances"] - 1 == read_summary(out)["utterances"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no old/partial copies left


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(session1, tmp_path):
    root, _ = session1
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("irreplaceable")
    with pytest.raises(DataError, match="not a dataset"):
        prepare_dataset(root, precious, overwrite=True)
    assert (precious / "chapter1.tex").read_text() == "irreplaceable"


def test_an_empty_folder_is_a_fine_target(session1, tmp_path):
    root, utterances = session1
    (tmp_path / "ds").mkdir()
    assert prepare_dataset(root, tmp_path / "ds")["utterances"] == len(utterances)


def _crash_after_first_part(monkeypatch):
    real_write = pq.write_table
    calls = []

    def write_then_crash(*args, **kwargs):
        if calls:
            raise OSError("disk full (simulated)")
        calls.append(args)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(parquet.pq, "write_table", write_then_crash)
    return calls


def test_a_crash_mid_write_leaves_no_dataset_and_no_temp(synthetic_corpus, tmp_path, monkeypatch):
    calls = _crash_after_first_part(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        prepare_dataset(synthetic_corpus, tmp_path / "ds", rows_per_part=8)
    assert len(calls) == 1  # one part was written before the crash
    assert os.listdir(tmp_path) == []


def test_a_crash_during_overwrite_keeps_the_old_dataset(session1, tmp_path, monkeypatch):
    root, _ = session1
    out = tmp_path / "ds"
    old = prepare_dataset(root, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _crash_after_first_part(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        prepare_dataset(root, out, overwrite=True, features=True, rows_per_part=4)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and read_summary(out) == old
    assert sorted(os.listdir(tmp_path)) == ["corpus", "ds"]


def test_partials_of_a_killed_run_are_removed_whatever_the_host_and_pid(session1, tmp_path):
    root, _ = session1
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # its pid is alive
    try:
        debris = [tmp_path / f".ds.partial-{socket.gethostname()}-{alive.pid}-0badcafe",
                  tmp_path / ".ds.partial-another-host-1-00c0ffee", tmp_path / ".ds.partial-1a2b3c4d"]
        for folder in debris:
            folder.mkdir()
            (folder / "part-00000.parquet").write_bytes(b"half")
        prepare_dataset(root, tmp_path / "ds")
    finally:
        alive.kill()
        alive.wait()
    # No writer held the lock of ds, so whichever run left them, they were debris.
    assert not any(folder.exists() for folder in debris)
    assert sorted(os.listdir(tmp_path)) == ["corpus", "ds"]


def test_a_second_writer_stops_at_once_and_leaves_the_first_alone(session1, tmp_path):
    root, _ = session1
    first = AtomicFolder(tmp_path / "ds", writer="ser prepare", what="dataset", marker="-", is_ours=parquet.is_dataset,
                         overwrite=False).open()  # a prepare in progress: it holds the lock, its partial exists
    try:
        with pytest.raises(DataError, match=r"ds: another writer is writing this dataset now \(`ser prepare`, pid "):
            prepare_dataset(root, tmp_path / "ds", overwrite=True)
        assert first.partial.is_dir() and not (tmp_path / "ds").exists()
    finally:
        first.abort()
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_whose_exception_a_library_swallowed_still_stops_the_commit(tmp_path, signum):
    """numpy's ``Generator.choice`` swallowed a Ctrl-C in a few runs of 100 of `ser synth`, which then wrote its corpus
    to the end and exited 0 (tests/e2e/test_bad_input_signals.py). The signal is recorded when it arrives, and the
    commit raises its exception again: nothing is committed, the partial folder and the lock go."""
    # The handlers `ser` starts with (Python's own Ctrl-C, SIGTERM's default); an in-process Tune run earlier in
    # the suite leaves its own SIGINT handler behind.
    saved = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                 (signal.SIGTERM, signal.SIG_DFL))}
    try:
        _interrupt_a_write(tmp_path, signum)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _interrupt_a_write(tmp_path, signum):
    folder = AtomicFolder(tmp_path / "out", writer="ser synth", what="corpus", marker="-", is_ours=lambda p: False,
                          overwrite=False)
    expected = KeyboardInterrupt if signum == signal.SIGINT else SystemExit
    with pytest.raises(expected) as raised:
        with folder:
            (folder.partial / "part").write_text("written before the signal")
            try:  # a library's bare except around the moment the signal arrives
                os.kill(os.getpid(), signum)
                for _ in range(100):
                    time.sleep(0.01)  # the handler runs at the next bytecode; this only bounds the wait
                pytest.fail("the signal's exception never came")
            except BaseException as swallowed:  # noqa: BLE001 - what the library did
                assert isinstance(swallowed, expected)
            folder.commit()
    if signum == signal.SIGTERM:
        assert raised.value.code == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_read_summary_of_something_else_names_it(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        read_summary(tmp_path)


# Ray Data reading the dataset: tests/integration/test_parquet_ray.py.


# --- audio too short for the speech encoder ------------------------------------------------------------------

def test_the_minimum_length_is_wav2vec2s_receptive_field():
    """Checked against transformers' own wav2vec2 feature encoder: 400 samples give it one frame, 399 none."""
    import torch
    from transformers import Wav2Vec2Config
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

    from ser_platform.config import SpeechEncoderConfig
    from ser_platform.models.speech import build_speech_encoder_config

    base = Wav2Vec2Config()  # wav2vec2-base's conv stack: kernels (10,3,3,3,3,2,2), strides (5,2,2,2,2,2,2)
    assert parquet.conv_receptive_field(base.conv_kernel, base.conv_stride) == parquet.MIN_AUDIO_SAMPLES == 400
    tiny = build_speech_encoder_config(SpeechEncoderConfig())
    assert parquet.conv_receptive_field(tiny.conv_kernel, tiny.conv_stride) == 330 <= parquet.MIN_AUDIO_SAMPLES
    features = Wav2Vec2FeatureEncoder(Wav2Vec2Config(conv_dim=(4,) * 7)).eval()  # base's stack, narrow channels
    with torch.no_grad():
        assert features(torch.zeros(1, 400)).shape[-1] == 1
        assert features(torch.zeros(1, 400 + 320)).shape[-1] == 2  # one more frame per 320-sample stride
        with pytest.raises(RuntimeError):
            features(torch.zeros(1, 399))  # what `ser predict` and `ser cache` met before the rule


def test_short_audio_is_refused_after_resampling(tmp_path):
    wav = tmp_path / "short.wav"
    _write_wav(wav, np.full(200, 0.1, np.float32), 8000)  # 200 samples at 8 kHz = 400 at 16 kHz: long enough
    audio, info = parquet.load_audio(wav)
    assert len(audio) == 400 and info["resampled"]
    _write_wav(wav, np.full(199, 0.1, np.float32), 8000)
    with pytest.raises(DataError, match=r"short\.wav: audio of 398 samples \(24\.9 ms at 16000 Hz\) is shorter "
                                        r"than the speech encoder's receptive field of 400 samples \(25 ms\)"):
        parquet.load_audio(wav)
    with pytest.raises(DataError, match=r"^row X: audio of 329 samples"):
        parquet.check_audio_length(329, "row X")
    parquet.check_audio_length(330, "row X", min_samples=330)  # an encoder's own field, as ser cache may pass
