"""`ser transcribe` as Ray Data batch inference: ``map_batches`` with an actor holding the tiny Whisper.

Truth: the in-process recogniser on the same audio (the tiny Whisper's weights come from a fixed seed, so the
actor's model is the driver's). The smallest shared dataset (40 utterances): the actor's start (torch and transformers imported in a
Ray worker) is most of this test's time. The Ray loader's text swap (``loader.fold_datasets`` with ``texts``) is
the same ``TranscriptSwap`` on pyarrow batches, tested in tests/unit/test_text_source.py.
"""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq

from ser_platform.data.transcripts import find_track, read_track_texts
from ser_platform.transcribe import Recognizer, RecognizerSpec, transcribe_dataset


def test_ray_data_actors_write_the_track_the_driver_would(ray_cluster, training_dataset, tmp_path):
    dataset = tmp_path / "parquet"
    shutil.copytree(training_dataset, dataset)
    table = pq.read_table(dataset, columns=["id", "audio"]).to_pydict()
    spec = RecognizerSpec("tiny", device="cpu", threads=1)
    expected = dict(zip(table["id"], Recognizer(spec).transcribe(table["audio"])))
    track = transcribe_dataset(str(dataset), spec, workers=1)
    assert track.metadata["workers"] == 1 and track.metadata["utterances"] == len(expected) == 40
    assert read_track_texts(find_track(dataset, "tiny")) == expected
