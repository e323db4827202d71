"""``data.train_text_source`` / ``data.test_text_source``: which text each split's text network reads (gold, or an
ASR track joined by utterance id), checked config values, the tracks a run reads found and pinned before it
starts, the scripted overlap on the text a run reads, and the sources in every run's params.

Truths: a hand-written track (``TrackWriter``) whose texts are known per id; the gold transcripts read here with
pyarrow; ``overlap.transcript_overlap`` on gold columns; ``folds.fold_spec``'s speakers.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from ser_platform.config import ConfigError, load_config
from ser_platform.data.errors import DataError
from ser_platform.data.folds import fold_spec
from ser_platform.data.loader import LocalFolds
from ser_platform.data.overlap import transcript_overlap
from ser_platform.data.transcripts import TranscriptSwap, gold_rows, load_split_texts, run_text_overlap
from ser_platform.tracking.runs import config_params
from ser_platform.transcribe import ensure_text_tracks

from support import copy_with_track


@pytest.fixture(scope="module")
def tracked(training_dataset: str, tmp_path_factory: pytest.TempPathFactory):
    """(dataset copy, gold columns, {id: text} of its track ``fake@r1``): every text "heard <id>", unique."""
    dataset, gold, texts = copy_with_track(training_dataset, tmp_path_factory.mktemp("text_source") / "parquet",
                                           lambda text, row_id: f"heard {row_id}")
    return dataset, gold, dict(zip(gold["id"], texts))


def config_for(dataset, train: str, test: str, **more):
    return load_config("demo", overrides={"data.dataset": str(dataset), "data.train_text_source": train,
                                          "data.test_text_source": test, "data.asr_model": "fake", **more})


@pytest.mark.parametrize("key", ["data.train_text_source", "data.test_text_source"])
@pytest.mark.parametrize("value", ["whisper", "asr:", "asr:@r1", "ASR"])
def test_bad_text_sources_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"{key}={value!r}.*'gold', 'asr'"):
        load_config("demo", overrides={key: value})


def test_good_text_sources_are_params(tmp_path):
    config = load_config("demo", overrides={"data.train_text_source": "gold",
                                            "data.test_text_source": "asr:openai/whisper-small@a1b2"})
    params = config_params(config)
    assert params["data.train_text_source"] == "gold"
    assert params["data.test_text_source"] == "asr:openai/whisper-small@a1b2"
    assert params["data.asr_model"] == "tiny"


def test_cached_text_states_are_refused_with_recognised_text():
    with pytest.raises(ConfigError, match="data.encoder_cache.*recognised text"):
        load_config("demo", overrides={"model.encoders": "frozen", "data.encoder_cache": "auto",
                                       "data.test_text_source": "asr"})


def test_local_folds_read_each_splits_own_text(tracked):
    dataset, gold, heard = tracked
    by_id = dict(zip(gold["id"], gold["transcript"]))
    spec = fold_spec(2, "loso5")
    for train, test in (("gold", "asr"), ("asr", "gold"), ("asr:fake@r1", "asr:fake")):
        folds = LocalFolds(str(dataset), config_for(dataset, train, test), collate=None)
        for split, source in (("train", train), ("val", train), ("test", test)):
            rows = folds.split(2, split)
            speakers = getattr(spec, f"{split}_speakers")
            assert rows["id"].size and set(map(str, rows["speaker"])) <= speakers
            expected = [(by_id if source == "gold" else heard)[i] for i in rows["id"]]
            assert list(rows["transcript"]) == expected, (train, test, split)


def test_rows_in_memory_need_their_texts(tracked):
    dataset, gold, _ = tracked
    rows = {k: gold[k] for k in ("id", "speaker", "transcript")}
    with pytest.raises(ValueError, match="pass texts="):
        LocalFolds(rows, config_for(dataset, "gold", "asr"), collate=None)


def test_a_row_the_track_lacks_is_named():
    swap = TranscriptSwap({"a": "x"}, "asr:m@r")
    assert swap.lookup(["a"]) == ["x"]
    with pytest.raises(DataError, match="row b: the ASR track asr:m@r has no text for it"):
        swap.lookup(["a", "b"])


def test_overlap_is_computed_on_the_text_a_run_reads(tracked):
    dataset, gold, heard = tracked
    rows = gold_rows(dataset)
    assert run_text_overlap(rows, None) == transcript_overlap(rows, "loso5")
    # A track that repeats the gold text: the same overlap as gold; unique recognised test text: none at all.
    same = TranscriptSwap(dict(zip(gold["id"], gold["transcript"])), "asr:same@r")
    texts = load_split_texts(dataset, "gold", "asr:fake", "fake")
    assert run_text_overlap(rows, type(texts)(train=same, test=same)) == transcript_overlap(rows, "loso5")
    unique = run_text_overlap(rows, texts)
    assert all(f["overlap_share"] == 0 for f in unique["folds"].values())
    assert transcript_overlap(rows, "loso5")["mean"]["scripted_overlap_share"] > 0  # the gold text does overlap


def test_tracks_are_pinned_before_a_run_and_missing_ones_named(tracked):
    dataset, _, _ = tracked
    said = []
    config = ensure_text_tracks(config_for(dataset, "gold", "asr:fake"), say=said.append)
    assert (config.data.train_text_source, config.data.test_text_source) == ("gold", "asr:fake@r1")
    assert any("text: train gold -> test asr:fake@r1" in line for line in said)
    config = ensure_text_tracks(config_for(dataset, "asr", "asr"), say=said.append)
    assert config.data.asr_model == "fake@r1" and config.data.test_text_source == "asr"
    with pytest.raises(DataError, match=r"no ASR track 'nope'.*ser transcribe --dataset .* --model nope"):
        ensure_text_tracks(config_for(dataset, "gold", "asr:nope"), say=said.append)
    # An explicit dataset without the tiny track: named too (only the embedded default writes it on first use).
    with pytest.raises(DataError, match="no ASR track 'tiny'"):
        ensure_text_tracks(config_for(dataset, "asr", "asr", **{"data.asr_model": "tiny"}), say=said.append)


def test_the_swap_rebuilds_only_the_transcript_of_a_pyarrow_batch(tracked):
    """The Ray loader's path (``fold_datasets``: ``map_batches(swap, batch_format="pyarrow")``)."""
    dataset, _, heard = tracked
    batch = pq.read_table(dataset).slice(3, 5)
    swapped = load_split_texts(dataset, "gold", "asr:fake", "fake").test(batch)
    assert swapped.column_names == batch.column_names
    assert swapped.schema.field("transcript").type == batch.schema.field("transcript").type
    assert swapped.column("transcript").to_pylist() == [heard[i] for i in batch.column("id").to_pylist()]
    for name in batch.column_names:
        if name != "transcript":
            assert swapped.column(name) is batch.column(name) or swapped.column(name).equals(batch.column(name))
