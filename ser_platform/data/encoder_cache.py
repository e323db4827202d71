"""Frozen-encoder cache: the hidden states of a frozen text or speech encoder for every utterance of a dataset,
stored once as Parquet beside the dataset and joined into training batches by utterance id.

Layout (``ROOT`` is ``DATASET.cache`` by default, :func:`default_cache_root`; a sibling, not a child, of the
dataset, so the dataset's fingerprint does not change when a cache is added)::

    ROOT/text/<safe name>@<revision>/layer=<L>/part-00000.parquet ...   one entry per (encoder, revision, layer)
    ROOT/text/<safe name>@<revision>/layer=<L>/_common_metadata         schema + the entry's metadata (JSON)
    ROOT/speech/<safe name>@<revision>/layer=<L>/...

``L`` is -1 for the encoder's output (``last_hidden_state``) or a hidden-state index (0 = embeddings).
Rows (:data:`ENTRY_SCHEMA`): ``id`` string; ``source_length`` int32 — tokens (text) or audio samples after
cropping (speech) the states were computed from; ``num_states`` int32 — T, tokens or wav2vec2 frames;
``states`` list<float32>, row-major (T, hidden_size), float32 as the encoder computed them.

Metadata (schema metadata ``ser_platform.encoder_cache``): ``format_version``, ``modality``, ``name``,
``revision``, ``layer``, ``hidden_size``, ``dataset``, ``dataset_fingerprint`` (``tracking.dataset_fingerprint``),
``rows``, ``settings`` (everything else the states depend on: the tokenizer and ``max_text_tokens`` for text; the
sample rate, ``max_audio_samples``, waveform normalisation and attention-mask rule for speech) and provenance
(device, batch size, versions, time). :func:`check_entry` compares all of it with what a config asks for and
raises :class:`StaleCacheError` naming every difference; a missing entry is reported with the entries that do
exist and how each differs (name, revision or layer).

Nothing is half-written: an entry is an ``AtomicFolder`` (``data/atomic_folder.py``): its parts go to a hidden
partial folder renamed into place only when complete; an old entry is removed only after the new one is in
place, and only if it is an entry (its ``_common_metadata`` holds the metadata); two runs cannot write one
entry at once; a run that fails removes its partial folder and the key folders it created (``ROOT/text/NAME@REV``).

This module only stores and reads states; ``ser_platform/frozen_encoders.py`` computes them (data imports no
model). :class:`CachedStatesCollate` wraps the loader's collate and adds ``text_states`` (B, T_L, D_t) and
``speech_ssl_states`` (B, T_w, D_w) to each batch, after checking per row that the cached states come from the
same tokens / audio samples as the batch.
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch.nn.utils.rnn import pad_sequence

from ser_platform.data.atomic_folder import AtomicFolder
from ser_platform.data.errors import DataError
from ser_platform.data.parquet import METADATA_FILE, arrow_table, filesystem_and_path

__all__ = [
    "CACHE_SUFFIX",
    "ENTRY_SCHEMA",
    "MODALITIES",
    "CachedStatesCollate",
    "EncoderKey",
    "EncoderStates",
    "EntryWriter",
    "StaleCacheError",
    "check_entry",
    "default_cache_root",
    "list_entries",
    "read_entry_metadata",
    "safe_name",
]

FORMAT_VERSION = 1
CACHE_SUFFIX = ".cache"
ENTRY_KEY = b"ser_platform.encoder_cache"
MODALITIES = ("text", "speech")
PART_BYTES = 64 * 2**20  # a part file is closed when its states reach this size
ENTRY_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source_length", pa.int32(), nullable=False),
    pa.field("num_states", pa.int32(), nullable=False),
    pa.field("states", pa.list_(pa.float32()), nullable=False),
])
# What a request names and what it must match in the stored metadata, in the order errors list them.
_IDENTITY = ("name", "revision", "layer")


class StaleCacheError(DataError):
    """A cache entry that does not match what the config and dataset ask for; the message names each difference."""


def default_cache_root(dataset: str | Path) -> str:
    """``DATASET.cache``: the cache folder beside a dataset (local path or URI)."""
    return str(dataset).rstrip("/") + CACHE_SUFFIX


def safe_name(name: str) -> str:
    """A model name or path as one folder name: ``facebook/wav2vec2-base`` -> ``facebook--wav2vec2-base``
    (the Hugging Face cache's convention); other characters outside ``[A-Za-z0-9._-]`` become ``_``. The full
    name is in the metadata and is checked, so two names mapping to one folder cannot be mixed up."""
    text = name.strip().strip("/").replace("/", "--")
    text = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    return text or "_"


@dataclass(frozen=True)
class EncoderKey:
    """Which states: modality ("text" | "speech"), encoder name, revision, layer (-1 = the encoder's output)."""

    modality: str
    name: str
    revision: str
    layer: int

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality={self.modality!r}: expected one of {MODALITIES}")

    @property
    def relative_path(self) -> str:
        return f"{self.modality}/{safe_name(self.name)}@{safe_name(self.revision)}/layer={int(self.layer)}"

    def describe(self) -> str:
        return f"{self.name}@{self.revision} layer {self.layer}"


def _join(root: str | Path, relative: str) -> str:
    return str(root).rstrip("/") + "/" + relative


def read_entry_metadata(entry: str | Path) -> dict[str, Any]:
    """The metadata stored in an entry's ``_common_metadata``; ``DataError`` if it is not a complete entry."""
    filesystem, where = filesystem_and_path(entry)
    try:
        schema = pq.read_schema(f"{where.rstrip('/')}/{METADATA_FILE}", filesystem=filesystem)
    except (FileNotFoundError, OSError, pa.ArrowException) as err:
        raise DataError(entry, f"not a complete encoder-cache entry (cannot read {METADATA_FILE}: {err})") from None
    metadata = schema.metadata or {}
    if ENTRY_KEY not in metadata:
        raise DataError(entry, f"{METADATA_FILE} holds no {ENTRY_KEY.decode()}: not written by `ser cache`")
    return json.loads(metadata[ENTRY_KEY])


def _is_entry(path: Path) -> bool:
    try:
        read_entry_metadata(path)
    except DataError:
        return False
    return True


def _exists(path: str) -> bool:
    filesystem, where = filesystem_and_path(path)
    if filesystem is None:
        return Path(where).exists()
    from pyarrow import fs

    return filesystem.get_file_info(where).type != fs.FileType.NotFound


def list_entries(root: str | Path, modality: str) -> list[dict[str, Any]]:
    """Metadata of every complete entry of ``modality`` under ``root`` (each with its ``path``)."""
    filesystem, where = filesystem_and_path(root)
    base = f"{where.rstrip('/')}/{modality}"
    if filesystem is None:
        candidates = sorted(str(p) for p in Path(base).glob("*/layer=*") if p.is_dir())
    else:
        from pyarrow import fs

        if filesystem.get_file_info(base).type == fs.FileType.NotFound:
            return []
        found = filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        candidates = sorted({f.path.rsplit("/", 1)[0] for f in found if f.path.endswith("/" + METADATA_FILE)})
        scheme = str(root).split("://", 1)[0]
        candidates = [f"{scheme}://{c}" for c in candidates]
    entries = []
    for path in candidates:
        try:
            entries.append({**read_entry_metadata(path), "path": path})
        except DataError:
            continue  # not complete: ignore (a partial folder is hidden, this is someone's debris)
    return entries


@dataclass(frozen=True)
class EntryRequest:
    """What a config and dataset ask of one entry: its key, the dataset's fingerprint and the settings."""

    key: EncoderKey
    dataset_fingerprint: str
    settings: Mapping[str, Any]


def _differences(stored: Mapping[str, Any], request: EntryRequest) -> list[str]:
    wanted = {"modality": request.key.modality, "name": request.key.name, "revision": request.key.revision,
              "layer": int(request.key.layer), "dataset_fingerprint": request.dataset_fingerprint}
    out = [f"{k}: cache {stored.get(k)!r}, wanted {v!r}" for k, v in wanted.items() if stored.get(k) != v]
    stored_settings = dict(stored.get("settings") or {})
    wanted_settings = json.loads(json.dumps(dict(request.settings), sort_keys=True, default=str))
    for k in sorted(set(stored_settings) | set(wanted_settings)):
        if stored_settings.get(k) != wanted_settings.get(k):
            out.append(f"{k}: cache {stored_settings.get(k, '<absent>')!r}, "
                       f"wanted {wanted_settings.get(k, '<absent>')!r}")
    return out


def check_entry(root: str | Path, request: EntryRequest, *, hint: str = "") -> tuple[str, dict[str, Any]]:
    """The path and metadata of the entry ``request`` names under ``root``, checked against everything the
    request holds. Raises :class:`StaleCacheError` that names each difference, or names the entries that exist
    (and how each differs) when the wanted one does not."""
    key = request.key
    path = _join(root, key.relative_path)
    advice = f" ({hint})" if hint else ""
    if not _exists(path):
        if not _exists(str(root)):
            raise StaleCacheError(root, f"no encoder cache here (wanted {key.modality} states of {key.describe()})"
                                        + advice)
        others = list_entries(root, key.modality)
        if not others:
            raise StaleCacheError(root, f"holds no {key.modality} states (wanted {key.describe()})" + advice)
        described = []
        for meta in others:
            differ = [f"{k} {meta.get(k)!r} instead of {getattr(key, k)!r}" for k in _IDENTITY
                      if meta.get(k) != getattr(key, k)]
            described.append(f"{meta.get('name')}@{meta.get('revision')} layer {meta.get('layer')} "
                             f"({'; '.join(differ) or 'same key, other folder'})")
        raise StaleCacheError(root, f"no {key.modality} states for {key.describe()}; the cache holds: "
                                    + ", ".join(described) + advice)
    metadata = read_entry_metadata(path)
    if int(metadata.get("format_version", 0)) != FORMAT_VERSION:
        raise StaleCacheError(path, f"format_version {metadata.get('format_version')!r}, this code reads "
                                    f"{FORMAT_VERSION}" + advice)
    differ = _differences(metadata, request)
    if differ:
        raise StaleCacheError(path, "stale encoder cache, it differs from what the config and dataset ask for: "
                                    + "; ".join(differ) + advice)
    return path, metadata


# --- writing -----------------------------------------------------------------------------------------------

class EntryWriter:
    """Writes one entry under a hidden temporary name; :meth:`commit` renames it into place (local paths only).

        with EntryWriter(root, key) as writer:
            writer.add(row_id, states, source_length)   # states (T, hidden_size) float32
            writer.commit(metadata)

    Leaving the block without ``commit`` (or with an exception) removes the temporary folder, and the key
    folders created for it. An existing entry is replaced (the caller decided it is stale), but a folder at the
    entry's place that is not an entry is refused, and so is a second writer of the same entry.
    """

    def __init__(self, root: str | Path, key: EncoderKey, *, part_bytes: int = PART_BYTES):
        if "://" in str(root):
            raise DataError(root, "the cache is written to a local folder (atomic rename needs one); copy it to "
                                  "object storage afterwards, e.g. `aws s3 sync`")
        self.key = key
        self.part_bytes = int(part_bytes)
        self.folder = AtomicFolder(Path(root).expanduser() / key.relative_path, writer="ser cache",
                                   what="encoder-cache entry", marker=f"{METADATA_FILE} with its metadata",
                                   is_ours=_is_entry, overwrite=True).open()
        self.out, self.partial = self.folder.out, self.folder.partial
        self.rows: list[dict[str, Any]] = []
        self.nbytes = 0
        self.parts = 0
        self.count = 0
        self.hidden_size: int | None = None
        self.ids: set[str] = set()
        self.committed = False

    def __enter__(self) -> "EntryWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.committed:
            self.abort()

    def add(self, row_id: str, states: np.ndarray, source_length: int) -> None:
        states = np.asarray(states, dtype=np.float32)
        if states.ndim != 2:
            raise ValueError(f"row {row_id}: states of shape {states.shape}, expected (T, hidden_size)")
        if self.hidden_size is None:
            self.hidden_size = int(states.shape[1])
        elif states.shape[1] != self.hidden_size:
            raise ValueError(f"row {row_id}: hidden size {states.shape[1]}, earlier rows {self.hidden_size}")
        if row_id in self.ids:
            raise ValueError(f"row {row_id}: written twice to {self.key.describe()}")
        self.ids.add(row_id)
        self.rows.append({"id": str(row_id), "source_length": int(source_length), "num_states": int(states.shape[0]),
                          "states": np.ascontiguousarray(states).reshape(-1)})
        self.nbytes += states.nbytes
        self.count += 1
        if self.nbytes >= self.part_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        try:
            pq.write_table(arrow_table(self.rows, ENTRY_SCHEMA), self.partial / f"part-{self.parts:05d}.parquet",
                           compression="zstd", use_byte_stream_split=["states.list.element"])
        except OSError as err:
            full = self.folder.out_of_room(err)
            if full is None:
                raise
            raise full from err
        self.parts += 1
        self.rows, self.nbytes = [], 0

    def commit(self, metadata: Mapping[str, Any]) -> Path:
        """Write the last part and the metadata (plus format_version, key, hidden_size, rows), then rename."""
        self._flush()
        full = {**dict(metadata), "format_version": FORMAT_VERSION, "modality": self.key.modality,
                "name": self.key.name, "revision": self.key.revision, "layer": int(self.key.layer),
                "hidden_size": self.hidden_size, "rows": self.count, "parts": self.parts}
        full = json.loads(json.dumps(full, sort_keys=True, default=str))
        schema = ENTRY_SCHEMA.with_metadata({ENTRY_KEY: json.dumps(full, sort_keys=True).encode()})
        pq.write_metadata(schema, self.partial / METADATA_FILE)
        self.folder.commit()
        self.committed = True
        return self.out

    def abort(self) -> None:
        self.folder.abort()


# --- reading -----------------------------------------------------------------------------------------------

class EncoderStates:
    """One entry held in memory: ``lookup(ids)`` -> the (T, hidden_size) float32 states and source lengths.

    The whole entry is read once (decompressed Arrow, ~4 bytes per state value: e.g. ~3.8 GB for wav2vec2-base
    over IEMOCAP's 7 h, ~0.5 GB for roberta-large over its transcripts); rows are found through an id index.
    """

    def __init__(self, path: str, table: pa.Table, metadata: Mapping[str, Any]):
        self.path = str(path)
        self.metadata = dict(metadata)
        self.hidden_size = int(self.metadata["hidden_size"])
        self.table = table
        ids = table.column("id").to_pylist()
        self.index = {row_id: i for i, row_id in enumerate(ids)}
        if len(self.index) != len(ids):
            repeated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
            raise DataError(path, f"encoder cache lists id(s) {repeated[:5]} more than once")

    @classmethod
    def load(cls, path: str, *, expected_ids: Iterable[str] | None = None) -> "EncoderStates":
        """Read the entry at ``path``; with ``expected_ids``, raise ``DataError`` naming ids it lacks."""
        metadata = read_entry_metadata(path)
        filesystem, where = filesystem_and_path(path)
        table = pq.read_table(where, filesystem=filesystem, schema=ENTRY_SCHEMA)
        states = cls(path, table, metadata)
        if expected_ids is not None:
            states.check_ids(expected_ids)
        return states

    @property
    def ids(self) -> set[str]:
        return set(self.index)

    def check_ids(self, expected_ids: Iterable[str]) -> None:
        missing = sorted(set(expected_ids) - set(self.index))
        if missing:
            raise DataError(self.path, f"encoder cache lacks {len(missing)} of the dataset's ids (first: "
                                       f"{missing[:5]}); re-run `ser cache` for this dataset")

    def lookup(self, ids: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """(states per id, (T_i, hidden_size) float32; source lengths (B,) int64) in the order of ``ids``."""
        missing = [i for i in ids if i not in self.index]
        if missing:
            raise DataError(f"row {missing[0]}", f"not in the encoder cache {self.path} ({len(missing)} id(s) of "
                                                 "this batch are missing); re-run `ser cache` for this dataset")
        rows = self.table.take(pa.array([self.index[i] for i in ids], type=pa.int64()))
        counts = rows.column("num_states").to_numpy()
        flat = rows.column("states").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(counts * self.hidden_size)])
        states = [flat[offsets[i]:offsets[i + 1]].reshape(int(counts[i]), self.hidden_size) for i in range(len(ids))]
        return states, rows.column("source_length").to_numpy().astype(np.int64)


def _pad(states: Sequence[np.ndarray], length: int | None = None) -> torch.Tensor:
    padded = pad_sequence([torch.from_numpy(np.array(s, dtype=np.float32)) for s in states], batch_first=True)
    if length is not None and padded.shape[1] < length:
        padded = torch.nn.functional.pad(padded, (0, 0, 0, length - padded.shape[1]))
    return padded


class CachedStatesCollate(NumpyBatchCollateFn):
    """The loader's collate plus the cached states of each row: ``text_states`` (B, T_L, D_t), zero past each
    row's tokens and as long as ``input_ids``; ``speech_ssl_states`` (B, T_w, D_w), zero past each row's frames.

    Per row it checks that the states come from what the batch holds: as many token states as the tokenizer
    gives tokens (``attention_mask``), and speech states from as many audio samples as ``audio_lengths`` (the
    same cropping); otherwise ``DataError`` naming the row. A Ray ``NumpyBatchCollateFn``, like the collate.
    """

    def __init__(self, collate: Any, *, text: EncoderStates | None = None, speech: EncoderStates | None = None):
        if text is None and speech is None:
            raise ValueError("CachedStatesCollate needs text and/or speech states")
        self.collate = collate
        self.text = text
        self.speech = speech

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        out = self.collate(batch)
        ids = list(out["ids"])
        if self.text is not None:
            states, _ = self.text.lookup(ids)
            tokens = out["attention_mask"].sum(dim=1).tolist()
            for row_id, s, n in zip(ids, states, tokens):
                if s.shape[0] != n:
                    raise DataError(f"row {row_id}", f"the encoder cache {self.text.path} holds {s.shape[0]} token "
                                                     f"states but the tokenizer gives {n} tokens (another tokenizer "
                                                     "or data.max_text_tokens?)")
            out["text_states"] = _pad(states, out["attention_mask"].shape[1])
        if self.speech is not None:
            states, samples = self.speech.lookup(ids)
            lengths = out["audio_lengths"].tolist()
            for row_id, cached, n in zip(ids, samples.tolist(), lengths):
                if cached != n:
                    raise DataError(f"row {row_id}", f"the encoder cache {self.speech.path} was computed from "
                                                     f"{cached} audio samples, the batch holds {n} (other audio or "
                                                     "data.max_audio_seconds?)")
            out["speech_ssl_states"] = _pad(states)
        return out
