"""`ser transcribe` in process: the tiny offline Whisper, the ASR track written into a dataset folder as a whole
(never touching the audio's part files), and its word error rates.

Truths: jiwer's own ``wer`` on each session's / fold's (normalised) utterances; the dataset's part files compared
byte for byte before and after; the dataset's ids and folds (``folds.fold_spec``) read here independently.
The tiny Whisper's text is noise: nothing here checks its quality.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import jiwer
import numpy as np
import pyarrow.parquet as pq
import pytest

from ser_platform.cli import main
from ser_platform.data.errors import DataError
from ser_platform.data.folds import all_folds
from ser_platform.data.overlap import normalise_transcript
from ser_platform.data.parquet import check_dataset
from ser_platform.data.transcripts import (TRACKS_DIR, TrackWriter, find_track, list_tracks, load_split_texts,
                                           read_track_texts, word_errors)
from ser_platform.transcribe import Recognizer, RecognizerSpec, tiny_revision, transcribe_dataset

TINY = RecognizerSpec("tiny", device="cpu", threads=1)


def _part_digests(dataset: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dataset.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def transcribed(training_dataset: str, tmp_path_factory: pytest.TempPathFactory):
    """(dataset copy, part digests before, the JSON `ser transcribe --json` printed): one tiny-Whisper track."""
    dataset = tmp_path_factory.mktemp("transcribe") / "parquet"
    shutil.copytree(training_dataset, dataset)
    before = _part_digests(dataset)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["transcribe", "--dataset", str(dataset), "--model", "tiny", "--device", "cpu", "--threads", "1",
                     "--json"])
    assert code == 0
    return dataset, before, json.loads(out.getvalue())


def test_tiny_whisper_is_offline_and_deterministic():
    rng = np.random.default_rng(0)
    audio = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (8_000, 16_000, 24_000)]
    first, second = Recognizer(TINY), Recognizer(TINY)
    texts = first.transcribe(audio)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts) and any(texts)
    assert second.transcribe(audio) == texts  # the same weights (fixed seed) on every machine
    assert first.ref == f"tiny@{tiny_revision()}"
    assert first.transcribe([]) == []


def test_track_holds_one_text_per_utterance_and_leaves_the_audio_alone(transcribed):
    dataset, before, printed = transcribed
    assert _part_digests(dataset) == before  # no part file rewritten, none added
    check_dataset(dataset)  # readers still see exactly the dataset `ser prepare` wrote
    ids = pq.read_table(dataset, columns=["id"]).column("id").to_pylist()
    track = find_track(dataset, "tiny")
    assert track.ref == f"tiny@{tiny_revision()}" and printed["path"] == track.path
    texts = read_track_texts(track)
    assert sorted(texts) == sorted(ids) and all(isinstance(t, str) for t in texts.values())
    assert printed["utterances"] == len(ids) and printed["utterances_per_second"] > 0
    # Nothing but the finished track is left in the tracks folder (no partial folder, no lock file debris).
    assert [p.name for p in (dataset / TRACKS_DIR).iterdir() if not p.name.endswith(".lock")] == \
        [Path(track.path).name]


def test_wer_per_session_and_fold_is_jiwers(transcribed):
    dataset, _, printed = transcribed
    table = pq.read_table(dataset, columns=["id", "session", "speaker", "transcript"]).to_pydict()
    heard = read_track_texts(find_track(dataset, "tiny"))
    refs = [normalise_transcript(t) for t in table["transcript"]]
    hyps = [normalise_transcript(heard[i]) for i in table["id"]]
    assert all(refs), "the synthetic transcripts all have words (jiwer refuses empty references)"

    def truth(keep) -> float:
        chosen = [i for i in range(len(refs)) if keep(i)]
        return jiwer.wer([refs[i] for i in chosen], [hyps[i] for i in chosen])

    wer = printed["wer"]
    assert wer["all"]["wer"] == pytest.approx(truth(lambda i: True))
    assert wer["all"]["words"] == sum(len(r.split()) for r in refs)
    assert sorted(wer["sessions"]) == sorted({str(s) for s in table["session"]})
    for session, group in wer["sessions"].items():
        assert group["wer"] == pytest.approx(truth(lambda i: str(table["session"][i]) == session))
    for spec in all_folds("loso5"):
        fold = wer["folds"][str(spec.fold)]
        assert fold["test"]["wer"] == pytest.approx(truth(lambda i: table["speaker"][i] in spec.test_speakers))
        trained = spec.train_speakers | spec.val_speakers
        assert fold["train"]["wer"] == pytest.approx(truth(lambda i: table["speaker"][i] in trained))


def test_word_errors_count_jiwers_edits_on_normalised_text():
    refs = ["Oh, [LAUGHTER] don't go!", "yes", "I am here now"]
    hyps = ["oh dont go away", "no", "i here now"]
    counts = word_errors(refs, hyps)
    assert counts == [(1, 3), (1, 1), (1, 4)]  # one insertion, one substitution, one deletion
    truth = jiwer.process_words([normalise_transcript(r) for r in refs], [normalise_transcript(h) for h in hyps])
    assert sum(e for e, _ in counts) == truth.substitutions + truth.deletions + truth.insertions
    with pytest.raises(ValueError, match="2 references, 1 hypotheses"):
        word_errors(["a", "b"], ["a"])


def test_a_second_model_adds_its_own_track(transcribed, tmp_path):
    dataset = tmp_path / "parquet"
    shutil.copytree(transcribed[0], dataset)
    tiny = find_track(dataset, "tiny")
    tiny_texts = read_track_texts(tiny)
    ids = list(tiny_texts)
    with TrackWriter(dataset, "org/whisper-x", "abc123") as writer:
        writer.commit(ids, ["hello"] * len(ids), {"wer": {}})
    assert [t.ref for t in list_tracks(dataset)] == ["org/whisper-x@abc123", tiny.ref]
    assert read_track_texts(find_track(dataset, "tiny")) == tiny_texts  # the first track untouched
    texts = load_split_texts(dataset, "asr:org/whisper-x", "asr", "tiny")
    assert texts.train.lookup(ids[:2]) == ["hello", "hello"]
    assert texts.test.lookup(ids[:2]) == [tiny_texts[i] for i in ids[:2]]
    with pytest.raises(DataError, match="no ASR track 'other'.*tracks there: org/whisper-x@abc123"):
        find_track(dataset, "other")


def test_a_failed_recognition_leaves_no_track_and_an_existing_one_needs_overwrite(transcribed, tmp_path,
                                                                                   monkeypatch):
    dataset = tmp_path / "parquet"
    shutil.copytree(transcribed[0], dataset)
    shutil.rmtree(dataset / TRACKS_DIR)

    def broken(self, audio):
        raise RuntimeError("recogniser died mid-way")

    monkeypatch.setattr(Recognizer, "transcribe", broken)
    with pytest.raises(RuntimeError, match="died mid-way"):
        transcribe_dataset(str(dataset), TINY)
    assert list_tracks(dataset) == []
    left = list((dataset / TRACKS_DIR).iterdir()) if (dataset / TRACKS_DIR).exists() else []
    assert [p for p in left if not p.name.endswith(".lock")] == []  # no partial folder left behind
    assert _part_digests(dataset) == transcribed[1]
    monkeypatch.undo()

    shutil.copytree(transcribed[0] / TRACKS_DIR, dataset / TRACKS_DIR, dirs_exist_ok=True)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        transcribe_dataset(str(dataset), TINY)
    kept = read_track_texts(find_track(transcribed[0], "tiny"))
    assert read_track_texts(find_track(dataset, "tiny")) == kept
    replaced = transcribe_dataset(str(dataset), TINY, overwrite=True)  # the same weights: the same texts again
    assert read_track_texts(replaced) == kept and [t.ref for t in list_tracks(dataset)] == [replaced.ref]


def test_bad_options_are_one_line_errors(transcribed, capsys):
    assert main(["transcribe", "--dataset", str(transcribed[0]), "--model", "tiny", "--chunk-length", "45"]) == 2
    assert "--chunk-length=45.0" in capsys.readouterr().err
    assert main(["transcribe", "--dataset", "/nonexistent/ds", "--model", "tiny"]) == 2
    assert "/nonexistent/ds" in capsys.readouterr().err


def test_a_long_utterance_is_recognised_in_chunks():
    """One window decodes at most TINY_MAX_NEW_TOKENS byte tokens (one character each): a longer text for a 40 s
    utterance means the pipeline cut it into chunks and joined their texts."""
    from ser_platform.transcribe import TINY_MAX_NEW_TOKENS

    long = 0.1 * np.random.default_rng(1).standard_normal(40 * 16_000).astype(np.float32)
    [one_window] = Recognizer(RecognizerSpec("tiny", device="cpu", threads=1, chunk_length_s=30)).transcribe(
        [long[:30 * 16_000]])
    [chunked] = Recognizer(RecognizerSpec("tiny", device="cpu", threads=1, chunk_length_s=10)).transcribe([long])
    assert len(one_window) <= TINY_MAX_NEW_TOKENS < len(chunked)


def test_a_track_on_object_storage_is_listed_only_once_complete(transcribed, tmp_path):
    """The object-storage path (``ObjectStoreFolder``: no rename, the metadata file last), through a ``file://``
    URI, which pyarrow opens as a filesystem as it opens ``s3://``."""
    dataset = tmp_path / "parquet"
    shutil.copytree(transcribed[0], dataset)
    uri = f"file://{dataset}"
    ids = list(read_track_texts(find_track(uri, "tiny")))
    with TrackWriter(uri, "org/whisper-x", "abc123") as writer:
        # Under way: its folder and in-progress object exist, but it is not a track yet.
        assert (dataset / TRACKS_DIR / "org--whisper-x@abc123").is_dir()
        assert [t.model for t in list_tracks(uri)] == ["tiny"]
        writer.commit(ids, ["hello"] * len(ids), {"wer": {}})
    assert [t.ref for t in list_tracks(uri)] == ["org/whisper-x@abc123", f"tiny@{tiny_revision()}"]
    assert read_track_texts(find_track(uri, "org/whisper-x")) == dict.fromkeys(ids, "hello")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with TrackWriter(uri, "org/whisper-x", "abc123"):
            pass
    with pytest.raises(RuntimeError, match="killed"):  # an interrupted writer removes what it wrote
        with TrackWriter(uri, "org/other", "r1") as writer:
            raise RuntimeError("killed")
    assert [t.model for t in list_tracks(uri)] == ["org/whisper-x", "tiny"]
    assert not (dataset / TRACKS_DIR / "org--other@r1").exists()


def test_a_local_dataset_is_refused_when_actors_run_on_other_nodes():
    from ser_platform.config import ConfigError
    from ser_platform.transcribe import check_reachable

    check_reachable("/data/ds", nodes=1)  # one machine: its own disk
    check_reachable("s3://bucket/ds", nodes=4)
    check_reachable("/data/ds", nodes=4, shared_filesystem=True)
    with pytest.raises(ConfigError, match="--dataset /data/ds: local to this machine.*4 nodes.*s3://"):
        check_reachable("/data/ds", nodes=4)
