"""From the Parquet dataset to padded torch batches: fold splits in Ray Data, batch plans, and the collate.

    fold_datasets(dataset, spec)  -> {"train", "val", "test"} Ray Datasets filtered by speaker (expressions),
                                     each reading the text its source names (gold, or an ASR track)
    train_batches(shard, collate) -> one epoch of training batches, reshuffled per epoch from a seed;
                                     optionally class-balanced (so every batch holds triplets) and/or
                                     bucketed by length (less padding)
    eval_batches(shard, collate)  -> this rank's share of an evaluation split, in a fixed order
    make_collate(tokenizer, ...)  -> numpy batch (Ray Data's form) -> dict of padded tensors + lengths/masks
    LocalFolds(dataset, ...)      -> the same splits and batches in one process, no Ray (tests, benchmarks,
                                     the encoder cache): ``batches_for`` of ``train.fit_folds``

Text: every split's ``transcript`` column is what its text network reads. With ``texts``
(``data.transcripts.load_split_texts``: ``data.train_text_source`` for train and val, ``data.test_text_source``
for test) a split's ``transcript`` is replaced row by row by its ASR track's text (``TranscriptSwap``), in the
Ray path and in ``LocalFolds`` alike, before the split is materialised.

Ray Data hands the collate a dict of numpy arrays: scalar columns as 1-d arrays, ``list<float32>`` columns as
an object array of 1-d float32 arrays (or a 2-d array when every row happens to have the same length). Masks
are bool, True = keep, as everywhere in the model.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch.nn.utils.rnn import pad_sequence

from ser_platform.data.errors import DataError
from ser_platform.data.features import FeatureParams, num_frames
from ser_platform.data.iemocap import CLASSES
from ser_platform.data.transcripts import GOLD, SplitTexts, load_split_texts

if TYPE_CHECKING:
    import ray.data

    from ser_platform.data.folds import FoldSpec

# Columns the training pipeline reads; the rest (raw_label, gender) are dropped before a fold is materialised.
BASE_COLUMNS = ("id", "session", "speaker", "mode", "label", "transcript", "audio", "duration")
FEATURE_COLUMNS = ("mfcc", "spectrogram", "num_frames")
RAGGED_COLUMNS = ("audio", "mfcc", "spectrogram")
# Rows held by the per-epoch local shuffle. At demo size this is the whole shard (a full shuffle); on IEMOCAP
# (~4,400 training rows, ~0.3 MB of audio each) 2,048 rows cost ~0.6 GB per worker.
SHUFFLE_BUFFER_ROWS = 2048
# Batches planned together when balancing classes or bucketing by length: more = better buckets, more memory.
POOL_BATCHES = 16
LABEL_INDEX = {name: index for index, name in enumerate(CLASSES)}


# --- the collate -------------------------------------------------------------------------------------------

class SERCollate(NumpyBatchCollateFn):
    """Numpy batch -> the keyword arguments of ``SERModel.forward`` plus ``labels``, ``ids`` and ``mode``.

    Output (B = rows, S = longest cropped audio, L = longest token sequence, T = longest feature sequence):
    ``input_values`` (B, S) float32 zero-padded, ``audio_lengths`` (B,) long, ``input_ids`` (B, L) long,
    ``attention_mask`` (B, L) bool, ``labels`` (B,) long in ``CLASSES`` order, ``ids`` / ``mode`` lists of str;
    ``mfcc`` (B, T, n_mfcc), ``spectrogram`` (B, T, n_freq) float32 and ``feature_lengths`` (B,) long when the
    dataset has precomputed features, else ``None`` (the training loop computes them on its device).
    Audio longer than ``max_audio_samples`` is cropped to its start, and precomputed features to the frames
    of the cropped audio. A subclass of Ray's ``NumpyBatchCollateFn`` so ``iter_torch_batches`` hands it numpy.
    """

    def __init__(self, tokenizer: Any, *, max_text_tokens: int, max_audio_samples: int,
                 feature_params: FeatureParams | None = None):
        if max_audio_samples < 1:
            raise ValueError(f"max_audio_samples={max_audio_samples!r}: expected >= 1")
        self.tokenizer = tokenizer
        self.max_text_tokens = int(max_text_tokens)
        self.max_audio_samples = int(max_audio_samples)
        self.feature_params = feature_params or FeatureParams()
        self.max_frames = num_frames(self.max_audio_samples, self.feature_params)
        # A fast tokenizer called with padding/truncation arguments mutates its Rust state ("Already borrowed"
        # when two threads do it at once); Ray collates in a prefetch thread, so calls are serialised.
        self._tokenizer_lock = threading.Lock()

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        ids = [str(i) for i in batch["id"]]
        if not ids:
            raise ValueError("collate: empty batch")
        labels = []
        for row_id, label in zip(ids, batch["label"]):
            label = str(label)
            if label not in LABEL_INDEX:
                raise DataError(f"row {row_id}", f"label {label!r} is not one of {CLASSES}")
            labels.append(LABEL_INDEX[label])

        audio = []
        for row_id, row in zip(ids, batch["audio"]):
            samples = np.asarray(row, dtype=np.float32)
            if samples.ndim != 1 or samples.size == 0:
                raise DataError(f"row {row_id}", f"audio: expected a non-empty 1-d signal, got shape {samples.shape}")
            audio.append(torch.tensor(samples[: self.max_audio_samples]))  # a copy: Ray's arrays are read-only
        audio_lengths = torch.tensor([len(a) for a in audio], dtype=torch.long)

        with self._tokenizer_lock:
            tokens = self.tokenizer([str(t) for t in batch["transcript"]], padding=True, truncation=True,
                                    max_length=self.max_text_tokens, return_tensors="pt")
        out: dict[str, Any] = {
            "input_values": pad_sequence(audio, batch_first=True),
            "audio_lengths": audio_lengths,
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].bool(),
            "labels": torch.tensor(labels, dtype=torch.long),
            "ids": ids,
            "mode": [str(m) for m in batch["mode"]] if "mode" in batch else [""] * len(ids),
            "mfcc": None,
            "spectrogram": None,
            "feature_lengths": None,
        }
        if "mfcc" in batch and "spectrogram" in batch and "num_frames" in batch:
            out.update(self._features(ids, batch))
        return out

    def _features(self, ids: Sequence[str], batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        mfccs, spectrograms, lengths = [], [], []
        for row_id, mfcc, spec, frames in zip(ids, batch["mfcc"], batch["spectrogram"], batch["num_frames"]):
            frames = int(frames)
            mfcc = np.asarray(mfcc, dtype=np.float32)
            spec = np.asarray(spec, dtype=np.float32)
            if frames < 1 or mfcc.size % frames or spec.size % frames:
                raise DataError(f"row {row_id}", f"num_frames={frames} does not divide the flattened mfcc "
                                                 f"({mfcc.size}) / spectrogram ({spec.size}) lengths")
            keep = min(frames, self.max_frames)
            mfccs.append(torch.from_numpy(mfcc.reshape(frames, -1)[:keep].copy()))
            spectrograms.append(torch.from_numpy(spec.reshape(frames, -1)[:keep].copy()))
            lengths.append(keep)
        return {"mfcc": pad_sequence(mfccs, batch_first=True),
                "spectrogram": pad_sequence(spectrograms, batch_first=True),
                "feature_lengths": torch.tensor(lengths, dtype=torch.long)}


def make_collate(tokenizer: Any, *, max_text_tokens: int, max_audio_samples: int,
                 feature_params: FeatureParams | None = None) -> SERCollate:
    """The collate for ``iter_torch_batches(collate_fn=...)`` (see :class:`SERCollate`)."""
    return SERCollate(tokenizer, max_text_tokens=max_text_tokens, max_audio_samples=max_audio_samples,
                      feature_params=feature_params)


# --- batch plans (pure numpy: which rows of a pool go into which batch) ------------------------------------

def plan_batches(labels: np.ndarray, lengths: np.ndarray, batch_size: int, *, samples_per_class: int,
                 bucket_by_length: bool, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Split a pool of rows into full batches of ``batch_size`` and a leftover (fewer than ``batch_size`` rows).

    Returns (batches: row indices per batch, leftover: row indices). Every row lands exactly once.

    * ``samples_per_class = m > 0``: rows are queued per class (in random order); a batch is filled by taking
      ``m`` rows from one class, then ``m`` from the next, cycling through the classes in a random order, so
      each batch holds groups of ``m`` same-class rows (PML's ``MPerClassSampler`` layout, without its limit
      of ``batch_size / m`` distinct classes) and the triplet loss finds positives and negatives in it.
      A class that runs short gives what it has.
    * ``bucket_by_length``: rows of similar length share a batch (each class queue, or the whole pool, sorted
      by length); the batch order is then shuffled so lengths do not rise through the epoch.
    * neither: a random permutation cut into batches.
    """
    n = len(labels)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected >= 1")
    if len(lengths) != n:
        raise ValueError(f"labels ({n}) and lengths ({len(lengths)}) differ in length")
    order = rng.permutation(n)
    num_full = n // batch_size
    if samples_per_class <= 0:
        leftover = order[num_full * batch_size:]
        body = order[: num_full * batch_size]
        if bucket_by_length:
            body = body[np.argsort(lengths[body], kind="stable")]
        batches = [body[i * batch_size:(i + 1) * batch_size] for i in range(num_full)]
    else:
        classes = rng.permutation(np.unique(labels))
        queues = []
        for c in classes:
            queue = order[labels[order] == c]
            if bucket_by_length:
                queue = queue[np.argsort(lengths[queue], kind="stable")]
            queues.append(list(queue))
        heads = [0] * len(queues)
        batches, current, turn = [], [], 0
        while len(batches) < num_full:
            q = turn % len(queues)
            turn += 1
            take = min(samples_per_class, len(queues[q]) - heads[q], batch_size - len(current))
            if take <= 0:
                continue
            current.extend(queues[q][heads[q]:heads[q] + take])
            heads[q] += take
            if len(current) == batch_size:
                batches.append(np.asarray(current, dtype=np.int64))
                current = []
        leftover = np.asarray(current + [i for q, h in zip(queues, heads) for i in q[h:]], dtype=np.int64)
    if batches:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches, np.asarray(leftover, dtype=np.int64)


def _row_lengths(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    if "duration" in batch:
        return np.asarray(batch["duration"], dtype=np.float64)
    return np.asarray([len(a) for a in batch["audio"]], dtype=np.float64)


def _as_row_arrays(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ragged columns as 1-d object arrays (Ray gives a 2-d array when all rows are equally long), so pools
    of different shapes concatenate."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value) if not isinstance(value, np.ndarray) else value
        if key in RAGGED_COLUMNS and value.dtype != object:
            rows = np.empty(len(value), dtype=object)
            rows[:] = [np.asarray(r) for r in value]
            value = rows
        out[key] = value
    return out


def _take(batch: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {key: value[index] for key, value in batch.items()}


def _concat(a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if a is None or len(next(iter(a.values()))) == 0:
        return dict(b)
    return {key: np.concatenate([a[key], b[key]]) for key in b}


def plan_pool_batches(pools: Iterable[Mapping[str, np.ndarray]], batch_size: int, *, samples_per_class: int,
                      bucket_by_length: bool, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Numpy row pools -> numpy batches by :func:`plan_batches`; a pool's leftover joins the next pool.

    Every row is yielded once; all batches are full except possibly the last, so ``n`` rows always give
    ``ceil(n / batch_size)`` batches (DDP ranks with equal shards take equal numbers of steps).
    """
    rng = np.random.default_rng(seed)
    carry: dict[str, np.ndarray] | None = None
    for pool in pools:
        pool = _concat(carry, _as_row_arrays(pool))
        labels = np.asarray([LABEL_INDEX.get(str(v), -1) for v in pool["label"]])
        batches, leftover = plan_batches(labels, _row_lengths(pool), batch_size, samples_per_class=samples_per_class,
                                         bucket_by_length=bucket_by_length, rng=rng)
        for index in batches:
            yield _take(pool, index)
        carry = _take(pool, leftover)
    if carry is not None and len(carry["id"]):
        yield carry


def train_batches(shard: Any, collate: SERCollate, *, batch_size: int, seed: int, samples_per_class: int = 0,
                  bucket_by_length: bool = False, shuffle_buffer_rows: int = SHUFFLE_BUFFER_ROWS) -> Iterator[dict]:
    """One epoch of training batches from a Ray ``DataIterator`` (``get_dataset_shard``) or ``Dataset``.

    The order comes from ``seed`` (pass a different seed per epoch: FACTS — a fixed ``random_shuffle`` seed
    repeats the same order every epoch): Ray's local shuffle buffer with ``local_shuffle_seed=seed``, then,
    for class-balanced or length-bucketed batches, :func:`plan_pool_batches` over pools of
    ``POOL_BATCHES * batch_size`` rows with the same seed. Plain batches go straight through
    ``iter_torch_batches(collate_fn=collate)``, which collates in Ray's prefetch thread.
    """
    buffer = max(int(shuffle_buffer_rows), batch_size)
    if samples_per_class <= 0 and not bucket_by_length:
        yield from shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate, device="cpu",
                                            local_shuffle_buffer_size=buffer, local_shuffle_seed=seed)
        return
    pool_rows = POOL_BATCHES * batch_size
    pools = shard.iter_batches(batch_size=pool_rows, batch_format="numpy",
                               local_shuffle_buffer_size=max(buffer, pool_rows), local_shuffle_seed=seed)
    for batch in plan_pool_batches(pools, batch_size, samples_per_class=samples_per_class,
                                   bucket_by_length=bucket_by_length, seed=seed):
        yield collate(batch)


def eval_batches(shard: Any, collate: SERCollate, *, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[dict]:
    """This rank's share of an evaluation split: batches ``rank, rank + world_size, ...`` of the whole split.

    Every rank iterates the same unsplit split in the same order (give the trainer the split unsplit, with
    ``preserve_order``) and collates only its own batches; the loop gathers the predictions. Batch boundaries
    do not depend on ``world_size``, so scores are the same with 1 or N workers.
    """
    for index, batch in enumerate(shard.iter_batches(batch_size=batch_size, batch_format="numpy")):
        if index % world_size == rank:
            yield collate(batch)


# --- fold splits in Ray Data -------------------------------------------------------------------------------

def read_dataset(dataset: str, *, materialize: bool, columns: Sequence[str] | None = None) -> "ray.data.Dataset":
    """The Parquet dataset as a Ray Dataset of the columns training reads (order preserved), checked for
    the columns ``ser prepare`` writes. ``materialize=True`` reads it once into Ray's object store, so the
    fold splits filtered from it cost a few cheap tasks instead of one Parquet read each."""
    import ray.data

    base = ray.data.read_parquet(dataset)
    base.context.execution_options.preserve_order = True
    available = set(base.schema().names)
    missing = sorted(set(BASE_COLUMNS) - available)
    if missing:
        raise DataError(str(dataset), f"missing column(s) {missing}; expected a dataset from `ser prepare`")
    wanted = list(columns) if columns is not None else (
        list(BASE_COLUMNS) + [c for c in FEATURE_COLUMNS if c in available])
    base = base.select_columns(wanted)
    return base.materialize() if materialize else base


def fold_datasets(dataset: "str | ray.data.Dataset", spec: "FoldSpec", *, materialize: bool,
                  texts: SplitTexts | None = None) -> dict[str, "ray.data.Dataset"]:
    """``{"train", "val", "test"}`` Ray Datasets of one fold: rows whose speaker is in the spec's
    ``train_speakers`` / ``val_speakers`` / ``test_speakers`` (filters are Ray Data expressions), each with the
    text of its source (``texts``; None = gold everywhere; module docstring).

    ``dataset`` is a Parquet path/URI or a Ray Dataset from :func:`read_dataset`. ``materialize=True`` holds
    each split in Ray's object store (measured on this machine: far faster per epoch than re-reading Parquet,
    see BENCHMARKS.md); ``False`` leaves them lazy, streamed from Parquet each epoch. Order is preserved, so a
    seed gives the same batches run after run.
    """
    from ray.data.expressions import col

    base = read_dataset(dataset, materialize=materialize) if isinstance(dataset, str) else dataset
    base.context.execution_options.preserve_order = True
    splits = {}
    for split, speakers in (("train", spec.train_speakers), ("val", spec.val_speakers),
                            ("test", spec.test_speakers)):
        ds = base.filter(expr=col("speaker").is_in(sorted(speakers)))
        swap = texts.for_split(split) if texts is not None else None
        if swap is not None:  # pyarrow batches: only the transcript column is rebuilt, the audio passes through
            ds = ds.map_batches(swap, batch_format="pyarrow", zero_copy_batch=True)
        splits[split] = ds.materialize() if materialize else ds
    return splits


# --- the in-process path (no Ray) ---------------------------------------------------------------------------

def _numpy_columns(table: Any) -> dict[str, np.ndarray]:
    """A pyarrow table as Ray Data's numpy batch form: scalar columns 1-d, list columns object arrays of 1-d."""
    out = {}
    for name in table.column_names:
        column = table.column(name)
        if name in RAGGED_COLUMNS:
            array = column.combine_chunks()
            values = array.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            offsets = array.offsets.to_numpy()
            rows = np.empty(len(array), dtype=object)
            rows[:] = [values[offsets[i]:offsets[i + 1]] for i in range(len(array))]
            out[name] = rows
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def iter_pools(dataset: str, columns: Sequence[str], pool_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's rows in file order, ``pool_rows`` at a time, in Ray Data's numpy batch form."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    for batch in pads.dataset(dataset, format="parquet").to_batches(columns=list(columns), batch_size=pool_rows):
        if batch.num_rows:
            yield _numpy_columns(pa.Table.from_batches([batch]))


def read_rows(dataset: str, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Every row of the dataset (the columns training reads by default), in file order, as numpy columns."""
    import pyarrow.parquet as pq

    if columns is None:
        available = set(pq.read_schema(next(iter(_parquet_files(dataset)))).names)
        columns = list(BASE_COLUMNS) + [c for c in FEATURE_COLUMNS if c in available]
    return _numpy_columns(pq.read_table(dataset, columns=list(columns)))


def _parquet_files(dataset: str) -> list[str]:
    import pyarrow.dataset as pads

    return pads.dataset(dataset, format="parquet").files


class LocalFolds:
    """The fold splits and batches of the Ray path (``fold_datasets``, ``train_batches``, ``eval_batches``) in one
    process from rows held in memory: the fold's speakers (``folds.fold_spec``), training batches reshuffled per
    epoch from the seed and planned by ``plan_pool_batches`` (class-balanced / length-bucketed as configured),
    evaluation batches in a fixed order, each rank taking its share. ``batches_for`` is ``train.fit_folds``'s.

    ``rows`` is a dataset path (read once with :func:`read_rows`) or numpy columns already in memory. ``texts``:
    the text of each split (module docstring); by default read from the dataset's tracks as the config's
    ``data.train_text_source`` / ``data.test_text_source`` name them (rows in memory need ``texts`` for those).
    """

    def __init__(self, rows: str | Mapping[str, np.ndarray], config: Any, collate: Any, *, rank: int = 0,
                 world_size: int = 1, texts: SplitTexts | None = None):
        data = config.data
        if texts is None and isinstance(rows, str):
            texts = load_split_texts(rows, data.train_text_source, data.test_text_source, data.asr_model)
        elif texts is None and (data.train_text_source, data.test_text_source) != (GOLD, GOLD):
            raise ValueError(f"LocalFolds: rows in memory with data.train_text_source={data.train_text_source!r}, "
                             f"data.test_text_source={data.test_text_source!r}: pass texts= (load_split_texts)")
        self.texts = texts
        self.rows = read_rows(rows) if isinstance(rows, str) else {k: np.asarray(v) for k, v in rows.items()}
        self.config = config
        self.collate = collate
        self.rank, self.world_size = rank, world_size
        self._splits: dict[tuple[int, str], dict[str, np.ndarray]] = {}

    def split(self, fold: int, split: str) -> dict[str, np.ndarray]:
        """The rows of ``split`` ("train", "val", "test") of ``fold``, in file order, with their source's text."""
        if (fold, split) not in self._splits:
            from ser_platform.data.folds import fold_spec

            spec = fold_spec(fold, self.config.data.protocol)
            keep = np.asarray([spec.split_for(str(s)) == split for s in self.rows["speaker"]], dtype=bool)
            rows = {k: v[keep] for k, v in self.rows.items()}
            swap = self.texts.for_split(split) if self.texts is not None else None
            self._splits[(fold, split)] = swap(rows) if swap is not None else rows
        return self._splits[(fold, split)]

    def batches_for(self, fold: int, split: str, epoch: int, *, rank: int | None = None,
                    world_size: int | None = None) -> list[dict]:
        """This rank's collated batches of ``split`` of ``fold`` in ``epoch`` (rank and world size default to the
        ones given at construction)."""
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        rows = self.split(fold, split)
        train = self.config.train
        if split != "train":
            size = train.batch_size
            chunks = ({k: v[i:i + size] for k, v in rows.items()} for i in range(0, len(rows["id"]), size))
            return [self.collate(b) for index, b in enumerate(chunks) if index % world_size == rank]
        from ser_platform.train import derive_seed

        seed = derive_seed(train.seed, fold, epoch, rank)
        shard = np.random.default_rng(derive_seed(train.seed, fold, epoch)).permutation(len(rows["id"]))[
            rank::world_size]
        size = max(1, train.batch_size // world_size)
        pool = POOL_BATCHES * size
        pools = ({k: v[shard[i:i + pool]] for k, v in rows.items()} for i in range(0, len(shard), pool))
        if train.samples_per_class <= 0 and not self.config.data.bucket_by_length:
            return [self.collate(b) for p in pools for b in
                    ({k: v[i:i + size] for k, v in p.items()} for i in range(0, len(p["id"]), size))]
        return [self.collate(b) for b in plan_pool_batches(pools, size, samples_per_class=train.samples_per_class,
                                                            bucket_by_length=self.config.data.bucket_by_length,
                                                            seed=seed)]

    __call__ = batches_for
