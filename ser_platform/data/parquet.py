"""IEMOCAP (real or synthetic) -> one Parquet dataset: a folder of part files, one row per utterance.

``prepare_dataset(source, out)`` parses ``source`` with ``parse_iemocap``, decodes every wav to mono float32 at
16 kHz, optionally computes the §3.2 features, and writes::

    out/part-00000.parquet ...   up to ``rows_per_part`` rows (or ``part_bytes``) each, one session per part,
                                 row groups of ``ROW_GROUP_ROWS`` rows, so Ray Data reads parts in parallel
    out/_common_metadata         the schema plus the summary (schema metadata ``ser_platform.summary``, JSON);
                                 Ray Data and pyarrow.dataset skip files named ``_*``

Columns (``dataset_schema``): ``id`` string, ``session`` int32, ``speaker`` string, ``gender`` string, ``mode``
string, ``label`` string (one of ``CLASSES``), ``raw_label`` string, ``transcript`` string, ``audio``
list<float32> (mono, 16 kHz), ``duration`` float32 (seconds, of the stored audio); with ``features=True`` also
``mfcc`` list<float32> (row-major (num_frames, 40)), ``spectrogram`` list<float32> (row-major (num_frames,
n_fft // 2 + 1)) and ``num_frames`` int32. The feature settings are in the summary (``feature_params``).
The summary also holds ``transcript_overlap`` (``data/overlap.py``): per loso5 fold, the share of test
transcripts that occur verbatim in training (IEMOCAP's scripted dialogs reuse their lines in every session).

Adding columns (e.g. cached frozen-encoder states): declare the fields in a tuple beside ``ACOUSTIC_FIELDS``
and add it in ``dataset_schema`` (or pass ``extra_fields``), then put a value under the same names in each row
dict. ``arrow_table`` builds every column from the schema alone: ``list<float32>`` columns take 1-d numpy arrays
(flatten 2-d states row-major and store their frame count in an int32 column, as ``mfcc``/``num_frames`` do),
scalar columns take Python values.

Bad input (see also ``parse_iemocap``): each problem raises ``DataError`` naming the file; with
``skip_bad=True`` the utterance is skipped and listed in the summary instead. Decoding checks made here:
a truncated wav (its ``data`` chunk declares more bytes than the file holds: libsndfile would silently return
the shorter audio), an undecodable file, zero samples, non-finite samples, and more than one channel. A
recording whose channels are all identical (mono saved as stereo) is downmixed and counted (``downmixed``);
channels that differ are an error, because IEMOCAP's sentence wavs are mono headset recordings and averaging
two different microphones would mix the other actor in. Other sample rates are resampled to 16 kHz (soxr,
librosa's default high-quality resampler) and counted per rate (``resampled``) — not an error.

Audio shorter than the speech encoder's receptive field is refused by one rule, ``check_audio_length``, for
every place audio enters: ``load_audio`` applies it (so ``prepare`` and ``ser predict``), and code that reads a
dataset's rows (``ser cache``) calls it per row. wav2vec2-base's CNN turns 400 samples (25 ms at 16 kHz) into
its first frame and raises on anything shorter; no real utterance is that short, so it is a cutting error,
not something to pad (padding would feed the encoder mostly silence and label it). Source rates outside 4 kHz..768 kHz are refused too (a header claiming 1 Hz
would otherwise be resampled into gigabytes).

Nothing is half-written, nothing is replaced that ``prepare`` did not write, and two runs cannot write one
``out`` at once: ``out`` is an ``AtomicFolder`` (``data/atomic_folder.py``): parts go to a hidden partial folder
renamed to ``out`` only when complete; a dataset at ``out`` is replaced only with ``overwrite=True``, only if
it is a dataset written here (its ``_common_metadata`` holds the summary), and only after the new one is
complete. ``out`` may not be inside the source corpus, nor hold it (resolved paths: ``..`` and symlinks
followed). ``out`` may also be ``s3://BUCKET/prefix`` or ``gs://BUCKET/prefix`` (pyarrow's filesystems; an
S3-compatible store through ``AWS_ENDPOINT_URL``): object stores have no rename, so the parts go to their final
keys and ``_common_metadata``, which ``check_dataset`` (every reader's gate) requires, is written last
(``ObjectStoreFolder``): a dataset there is readable only once complete, and a crash leaves none.

``check_dataset(path)`` checks a finished dataset before any work starts (reads ``_common_metadata`` and every
part's footer, no data): a zero-byte, truncated or foreign file, a folder, a part with other columns, a
deleted part and a row count that differs from the summary are each named.
"""

from __future__ import annotations

import collections
import json
import os
import re
import stat
import struct
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import threadpoolctl

from ser_platform.data.atomic_folder import AtomicFolder, ObjectStoreFolder, resolved
from ser_platform.data.errors import DataError, SkippedInput, file_problem, unreadable
from ser_platform.data.features import FeatureParams, features_from_power, power_spectrogram_librosa
from ser_platform.data.iemocap import CLASSES, Utterance, parse_iemocap
from ser_platform.data.overlap import format_overlap, transcript_overlap

SAMPLE_RATE = 16000
FORMAT_VERSION = 1
SUMMARY_KEY = b"ser_platform.summary"
FORMAT_KEY = b"ser_platform.format_version"
METADATA_FILE = "_common_metadata"
ROWS_PER_PART = 64  # ~18 MB of 4.5 s utterances, ~60 MB with features: bounded memory, many parallel reads
PART_BYTES = 64 * 2**20  # a part is closed early when its arrays reach this size (long utterances, features)
ROW_GROUP_ROWS = 16
PART_NAME = re.compile(r"^part-\d{5}\.parquet$")
# wav2vec2-base's CNN (kernels 10,3,3,3,3,2,2; strides 5,2,2,2,2,2,2: conv_receptive_field) needs 400 samples
# for one frame; the tiny encoder's stack needs 330. The larger is the rule, so a dataset serves every encoder.
MIN_AUDIO_SAMPLES = 400
SOURCE_RATES = (4_000, 768_000)  # Hz: outside this a wav header is broken, not speech

BASE_FIELDS = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("session", pa.int32(), nullable=False),
    pa.field("speaker", pa.string(), nullable=False),
    pa.field("gender", pa.string(), nullable=False),
    pa.field("mode", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("raw_label", pa.string(), nullable=False),
    pa.field("transcript", pa.string(), nullable=False),
    pa.field("audio", pa.list_(pa.float32()), nullable=False),
    pa.field("duration", pa.float32(), nullable=False),
)
ACOUSTIC_FIELDS = (
    pa.field("mfcc", pa.list_(pa.float32()), nullable=False),
    pa.field("spectrogram", pa.list_(pa.float32()), nullable=False),
    pa.field("num_frames", pa.int32(), nullable=False),
)


def dataset_schema(*, features: bool, extra_fields: Sequence[pa.Field] = ()) -> pa.Schema:
    """The dataset's columns: the base ones, the acoustic features if asked, then ``extra_fields``."""
    fields = list(BASE_FIELDS) + (list(ACOUSTIC_FIELDS) if features else []) + list(extra_fields)
    names = [f.name for f in fields]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"dataset_schema: column(s) {repeated} declared twice")
    return pa.schema(fields, metadata={FORMAT_KEY: str(FORMAT_VERSION).encode()})


# --- decoding ----------------------------------------------------------------------------------------------

def _wav_truncation(path: Path) -> str | None:
    """The problem if a RIFF/WAVE file's ``data`` chunk declares more bytes than the file holds, else None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None  # not a plain RIFF wav (RF64, other formats): leave it to libsndfile
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                available = size - offset - 8
                # 0 and 0xFFFFFFFF are "unknown length" placeholders of streaming writers.
                if chunk_size not in (0, 0xFFFFFFFF) and chunk_size > available:
                    return (f"truncated wav: the data chunk declares {chunk_size} bytes but the file holds only "
                            f"{available}")
                return None
            offset += 8 + chunk_size + (chunk_size & 1)  # chunks are padded to even sizes
    return None


def conv_receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Input samples a stack of 1-d convolutions needs for one output frame (e.g. a wav2vec2 config's
    ``conv_kernel`` and ``conv_stride``): r = k_1 + sum_i (k_i - 1) * s_1 * ... * s_(i-1)."""
    field, jump = 1, 1
    for kernel, stride in zip(kernels, strides, strict=True):
        field += (kernel - 1) * jump
        jump *= stride
    return field


def check_audio_length(num_samples: int, where: str | Path, *, sample_rate: int = SAMPLE_RATE,
                       min_samples: int = MIN_AUDIO_SAMPLES) -> None:
    """Refuse audio shorter than the speech encoder's receptive field (module docstring): ``DataError`` naming
    ``where`` (a file, or ``"row ID"``). ``min_samples``: an encoder's own ``conv_receptive_field``."""
    if num_samples < min_samples:
        raise DataError(where, f"audio of {num_samples} samples ({1000 * num_samples / sample_rate:.1f} ms at "
                               f"{sample_rate} Hz) is shorter than the speech encoder's receptive field of "
                               f"{min_samples} samples ({1000 * min_samples / sample_rate:.0f} ms); too short to "
                               "be an utterance (a cutting error?)")


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, *,
               mix_channels: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode ``path`` to a mono float32 signal at ``sample_rate``; raise ``DataError`` naming the file.

    ``mix_channels``: average channels that differ instead of refusing them (``ser predict`` on a user's own
    recording; corpora keep refusing, see the module docstring). Audio shorter than ``MIN_AUDIO_SAMPLES`` after
    resampling is refused (``check_audio_length``).
    Returns the signal and what was done to it: ``{"source_rate": int, "resampled": bool, "downmixed": bool}``.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise DataError(path, "audio file missing" if problem == "missing" else problem)
    problem = _wav_truncation(path)
    if problem:
        raise DataError(path, problem)
    try:
        rate = soundfile.info(str(path)).samplerate
        if not SOURCE_RATES[0] <= rate <= SOURCE_RATES[1]:
            raise DataError(path, f"sample rate {rate} Hz in its header; expected {SOURCE_RATES[0]} to "
                                  f"{SOURCE_RATES[1]} Hz (a broken header?)")
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.SoundFileError) as err:  # LibsndfileError: corrupt header or data
        raise DataError(path, f"corrupt audio, cannot decode it ({err})") from None
    if audio.shape[0] == 0:
        raise DataError(path, "zero-length audio (no samples)")
    downmixed = False
    if audio.shape[1] > 1:
        if mix_channels:
            audio = audio.mean(axis=1, keepdims=True)
        elif not np.all(audio == audio[:, :1]):
            raise DataError(path, f"{audio.shape[1]} channels with different content; expected mono (averaging "
                                  "two microphones would mix the other actor in)")
        downmixed = True
    audio = np.ascontiguousarray(audio[:, 0])
    if not np.all(np.isfinite(audio)):
        raise DataError(path, f"{int(np.sum(~np.isfinite(audio)))} non-finite samples (NaN or inf)")
    resampled = rate != sample_rate
    if resampled:
        import librosa

        audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq").astype(np.float32)
    check_audio_length(len(audio), path, sample_rate=sample_rate)
    return audio, {"source_rate": int(rate), "resampled": resampled, "downmixed": downmixed}


# --- writing -----------------------------------------------------------------------------------------------

def _list_column(values: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    lengths = np.fromiter((v.size for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"a part holds {offsets[-1]} list values, over list<>'s 2**31 limit: lower rows_per_part")
    flat = np.concatenate([np.asarray(v).reshape(-1) for v in values]) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=value_type))


def arrow_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """One column per schema field, built from the field's type alone (see the module docstring): ``list<>``
    columns from 1-d numpy arrays, scalar columns from Python values."""
    columns = []
    for f in schema:
        values = [row[f.name] for row in rows]
        if pa.types.is_list(f.type):
            columns.append(_list_column(values, f.type.value_type))
        else:
            columns.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


class _PartWriter:
    """Buffers rows and writes them as numbered part files of bounded rows and bytes, one session per part, into
    ``folder`` (a local path, or a path in ``filesystem``: object storage)."""

    def __init__(self, folder: Path | str, schema: pa.Schema, rows_per_part: int, part_bytes: int,
                 filesystem: Any = None):
        self.folder, self.schema, self.filesystem = str(folder).rstrip("/"), schema, filesystem
        self.rows_per_part, self.part_bytes = rows_per_part, part_bytes
        self.rows: list[dict[str, Any]] = []
        self.nbytes = 0
        self.parts = 0

    def add(self, row: dict[str, Any]) -> None:
        if self.rows and self.rows[-1]["session"] != row["session"]:
            self.flush()
        self.rows.append(row)
        self.nbytes += sum(v.nbytes for v in row.values() if isinstance(v, np.ndarray))
        if len(self.rows) >= self.rows_per_part or self.nbytes >= self.part_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = arrow_table(self.rows, self.schema)
        # Byte-stream split makes float32 samples compressible: zstd then saves ~35 % over snappy, and is faster.
        floats = [f"{f.name}.list.element" for f in self.schema if pa.types.is_list(f.type)
                  and pa.types.is_floating(f.type.value_type)]
        pq.write_table(table, f"{self.folder}/part-{self.parts:05d}.parquet", row_group_size=ROW_GROUP_ROWS,
                       compression="zstd", use_byte_stream_split=floats, filesystem=self.filesystem)
        self.parts += 1
        self.rows, self.nbytes = [], 0


def is_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a dataset written by ``ser prepare`` (its ``_common_metadata`` holds the summary):
    the marker ``prepare --overwrite`` requires before it replaces a folder."""
    try:
        read_summary(path)
    except DataError:
        return False
    return True


# --- the summary -------------------------------------------------------------------------------------------

def _summary(*, source: Path, out: Path | str, utterances: list[Utterance], seconds: float, parse_dropped, skipped,
             resampled: collections.Counter, downmixed: int, features: bool, schema: pa.Schema, parts: int,
             rows_per_part: int) -> dict[str, Any]:
    by_session: dict[str, dict[str, int]] = {}
    for u in utterances:
        by_session.setdefault(str(u.session), {c: 0 for c in CLASSES})[u.label] += 1
    summary = {
        "format_version": FORMAT_VERSION,
        "dataset": str(out),
        "source": str(source),
        "utterances": len(utterances),
        "seconds": round(seconds, 3),
        "hours": round(seconds / 3600, 4),
        "sample_rate": SAMPLE_RATE,
        "classes": {c: sum(1 for u in utterances if u.label == c) for c in CLASSES},
        "sessions": {s: sum(counts.values()) for s, counts in sorted(by_session.items())},
        "class_by_session": dict(sorted(by_session.items())),
        "speakers": dict(sorted(collections.Counter(u.speaker for u in utterances).items())),
        "modes": dict(sorted(collections.Counter(u.mode for u in utterances).items())),
        "dropped_labels": dict(sorted(parse_dropped.items())),
        "skipped": [{"path": s.path, "problem": s.problem} for s in skipped],
        "resampled": {str(rate): n for rate, n in sorted(resampled.items())},
        "downmixed": downmixed,
        "features": features,
        "feature_params": FeatureParams().to_dict() if features else None,
        "columns": schema.names,
        # Scripted lines recur across sessions: how many test transcripts training has read, per loso5 fold.
        "transcript_overlap": transcript_overlap(utterances, protocol="loso5"),
        "parts": parts,
        "rows_per_part": rows_per_part,
    }
    return json.loads(json.dumps(summary))  # exactly what read_summary will give back


def filesystem_and_path(path: str | Path):
    """(pyarrow filesystem, path in it) for a URI (s3://, gs://, file://), (None, the local path) otherwise."""
    text = str(path)
    if "://" not in text:
        return None, str(Path(text).expanduser())
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(text)
    except (pa.ArrowException, OSError) as err:
        raise DataError(path, f"cannot open this location ({err})") from None


def read_summary(dataset: str | Path) -> dict[str, Any]:
    """The summary stored in a dataset's ``_common_metadata`` (local path or a pyarrow URI: s3://, gs://)."""
    filesystem, root = filesystem_and_path(dataset)
    where = f"{root.rstrip('/')}/{METADATA_FILE}"
    problem = file_problem(where) if filesystem is None else None
    if problem and problem != "missing":  # a FIFO would block the reader
        raise DataError(where, f"{problem}; not a dataset from `ser prepare`")
    try:
        schema = pq.read_schema(where, filesystem=filesystem)
    except (FileNotFoundError, OSError, pa.ArrowException) as err:
        raise DataError(dataset, f"cannot read {METADATA_FILE}: not a complete dataset from `ser prepare` ({err})"
                        ) from None
    metadata = schema.metadata or {}
    if SUMMARY_KEY not in metadata:
        raise DataError(dataset, f"{METADATA_FILE} holds no {SUMMARY_KEY.decode()}: not written by `ser prepare`")
    try:
        return json.loads(metadata[SUMMARY_KEY])
    except ValueError as err:
        raise DataError(dataset, f"{METADATA_FILE}: its summary is not valid JSON ({err})") from None


def _dataset_entries(dataset: str | Path) -> list[tuple[str, str, int]]:
    """(name, "file" | "folder" | "other", size) of each entry of a dataset folder that readers would read:
    Ray Data and pyarrow.dataset skip names starting with "." or "_"."""
    filesystem, root = filesystem_and_path(dataset)
    entries = []
    if filesystem is None:
        try:
            with os.scandir(root) as listing:
                for entry in listing:
                    info = entry.stat()  # follows symlinks: a link to a part file is that file
                    kind = "file" if stat.S_ISREG(info.st_mode) else "folder" if stat.S_ISDIR(info.st_mode) else "other"
                    entries.append((entry.name, kind, info.st_size))
        except FileNotFoundError as err:
            raise DataError(err.filename or dataset, "does not exist (a dangling link or a deleted file?)") from None
        except OSError as err:
            raise DataError(err.filename or dataset, unreadable(err)) from None
    else:
        from pyarrow import fs

        for info in filesystem.get_file_info(fs.FileSelector(root, recursive=False)):
            kind = {fs.FileType.File: "file", fs.FileType.Directory: "folder"}.get(info.type, "other")
            entries.append((info.base_name, kind, info.size or 0))
    return sorted(e for e in entries if not e[0].startswith((".", "_")))


def check_dataset(dataset: str | Path) -> dict[str, Any]:
    """Check a dataset folder before any work starts and return its summary. Reads ``_common_metadata`` and each
    part file's footer only (no data). ``DataError`` naming the file: a zero-byte, truncated or foreign file, a
    folder or FIFO inside it, a part whose columns differ, a part the summary lists but that is gone, a part it
    does not list, or a row count that differs from the summary."""
    filesystem, root = filesystem_and_path(dataset)
    if filesystem is None:
        try:
            is_folder = stat.S_ISDIR(os.stat(root).st_mode)
        except FileNotFoundError:
            raise DataError(dataset, "does not exist (expected a folder written by `ser prepare`)") from None
        except OSError as err:
            raise DataError(dataset, unreadable(err)) from None
        if not is_folder:
            raise DataError(dataset, "is a file, not a dataset folder (expected a folder written by `ser prepare`)")
    summary = read_summary(dataset)
    expected = pq.read_schema(f"{root.rstrip('/')}/{METADATA_FILE}", filesystem=filesystem).remove_metadata()
    advice = "re-run `ser prepare --overwrite` or restore the dataset from a copy"
    rows = {}
    for name, kind, size in _dataset_entries(dataset):
        where = f"{str(dataset).rstrip('/')}/{name}"
        if kind != "file" or not PART_NAME.match(name):
            what = {"folder": "a folder", "other": "not a regular file"}.get(kind, "not a part file of the dataset")
            raise DataError(where, f"{what} inside the dataset folder; Ray Data would read it as part of the "
                                   "dataset: move it out (readers skip names starting with '.' or '_')")
        if size == 0:
            raise DataError(where, f"empty part file (0 bytes); {advice}")
        try:
            footer = pq.read_metadata(f"{root.rstrip('/')}/{name}", filesystem=filesystem)
        except (OSError, pa.ArrowException) as err:
            raise DataError(where, f"corrupt or truncated part file, cannot read its footer ({err}); {advice}"
                            ) from None
        schema = footer.schema.to_arrow_schema().remove_metadata()
        if not schema.equals(expected):
            differ = sorted(set(map(str, schema)) ^ set(map(str, expected)))
            raise DataError(where, f"its columns differ from the dataset's ({'; '.join(differ)}): a part of "
                                   f"another dataset? {advice}")
        rows[name] = footer.num_rows
    listed = {f"part-{i:05d}.parquet" for i in range(int(summary.get("parts", len(rows))))}
    missing, unlisted = sorted(listed - set(rows)), sorted(set(rows) - listed)
    if missing or unlisted:
        name = (missing or unlisted)[0]
        problem = (f"part file missing ({len(missing)} of the {len(listed)} parts the summary lists are gone)"
                   if missing else f"a part file the summary does not list (it lists {len(listed)})")
        raise DataError(f"{str(dataset).rstrip('/')}/{name}", f"{problem}; {advice}")
    if sum(rows.values()) != summary["utterances"]:
        raise DataError(dataset, f"its part files hold {sum(rows.values())} rows, the summary lists "
                                 f"{summary['utterances']} utterances; {advice}")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A readable account of a dataset summary: counts per session and class, audio, drops and skips."""
    lines = [f"Parquet dataset {summary['dataset']} ({summary['parts']} part files)",
             f"source: {summary['source']}",
             f"utterances: {summary['utterances']}, audio: {summary['hours']:.3f} h "
             f"({summary['seconds']:.1f} s, mono {summary['sample_rate']} Hz)"]
    if summary["features"]:
        params = summary["feature_params"]
        lines.append(f"features: mfcc ({params['n_mfcc']} coefficients, HTK mel), spectrogram "
                     f"({params['n_fft'] // 2 + 1} bins), {params['win_length']}-sample Hamming windows, "
                     f"hop {params['hop_length']}")
    width = max(len(c) for c in CLASSES)
    lines.append("")
    lines.append("session  " + "  ".join(f"{c:>{width}}" for c in CLASSES) + f"  {'total':>{width}}")
    for session, counts in summary["class_by_session"].items():
        lines.append(f"{session:>7}  " + "  ".join(f"{counts[c]:>{width}}" for c in CLASSES)
                     + f"  {sum(counts.values()):>{width}}")
    lines.append(f"{'all':>7}  " + "  ".join(f"{summary['classes'][c]:>{width}}" for c in CLASSES)
                 + f"  {summary['utterances']:>{width}}")
    lines.append("")
    dropped = summary["dropped_labels"]
    lines.append("dropped labels (outside the 4 classes): "
                 + (", ".join(f"{k} {v}" for k, v in dropped.items()) + f" ({sum(dropped.values())})"
                    if dropped else "none"))
    if summary["resampled"]:
        lines.append("resampled to 16 kHz: " + ", ".join(f"{n} from {r} Hz" for r, n in summary["resampled"].items()))
    if summary["downmixed"]:
        lines.append(f"downmixed (identical channels): {summary['downmixed']}")
    if summary.get("transcript_overlap"):  # absent from summaries written before it was added
        lines += format_overlap(summary["transcript_overlap"])
    skipped = summary["skipped"]
    lines.append(f"skipped inputs: {len(skipped)}" + (" (--skip-bad)" if skipped else ""))
    for item in skipped[:20]:
        lines.append(f"  {item['path']}: {item['problem']}")
    if len(skipped) > 20:
        lines.append(f"  ... and {len(skipped) - 20} more (see the JSON summary)")
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------------------

def _row(u: Utterance, audio: np.ndarray) -> dict[str, Any]:
    return {
        "id": u.id, "session": u.session, "speaker": u.speaker, "gender": u.gender, "mode": u.mode,
        "label": u.label, "raw_label": u.raw_label, "transcript": u.transcript, "audio": audio,
        "duration": len(audio) / SAMPLE_RATE,
    }


def _progress(items: Iterable[Utterance], total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="prepare", unit="utt", disable=not enabled)


def _source_and_out(source: str | Path, out: str | Path) -> tuple[Path, Path | str]:
    """Both resolved (symlinks and ``..`` followed; an ``s3://`` or ``gs://`` ``out`` kept as it is); ``DataError``
    if one holds the other or ``out`` has another scheme."""
    if "://" in str(out):
        scheme = str(out).split("://", 1)[0].lower()
        if scheme not in ("s3", "gs"):
            raise DataError(out, f"prepare writes a local folder, s3://BUCKET/prefix or gs://BUCKET/prefix, not "
                                 f"{scheme}://")
        return resolved(source), str(out).rstrip("/")
    source, out = resolved(source), resolved(out)
    if out == source or source in out.parents:
        raise DataError(out, f"is inside the source corpus {source}; write the dataset elsewhere")
    if out in source.parents:
        raise DataError(out, f"holds the source corpus {source}; replacing it would delete the corpus, write the "
                             "dataset elsewhere")
    return source, out


def _encode(parsed, writer: _PartWriter, *, features: bool, skip_bad: bool, progress: bool,
            clock: dict[str, float]) -> dict[str, Any]:
    """Decode (and featurise) every parsed utterance into ``writer``; what was kept, skipped, resampled."""
    params = FeatureParams()
    done = {"kept": [], "skipped": list(parsed.skipped), "resampled": collections.Counter(), "downmixed": 0,
            "seconds": 0.0}
    for u in _progress(parsed.utterances, len(parsed.utterances), progress):
        tick = time.perf_counter()
        try:
            audio, info = load_audio(u.wav_path)
        except DataError as err:
            if not skip_bad:
                raise
            done["skipped"].append(SkippedInput(err.path, err.problem))
            continue
        finally:
            clock["decode"] += time.perf_counter() - tick
        done["resampled"][info["source_rate"]] += info["resampled"]
        done["downmixed"] += info["downmixed"]
        row = _row(u, audio)
        if features:
            tick = time.perf_counter()
            mfcc, spectrogram = features_from_power(power_spectrogram_librosa(audio, params), params)
            row.update(mfcc=mfcc, spectrogram=spectrogram, num_frames=mfcc.shape[0])
            clock["features"] += time.perf_counter() - tick
        tick = time.perf_counter()
        writer.add(row)
        clock["write"] += time.perf_counter() - tick
        done["kept"].append(u)
        done["seconds"] += len(audio) / SAMPLE_RATE
    return done


def prepare_dataset(
    source: str | Path,
    out: str | Path,
    *,
    features: bool = False,
    overwrite: bool = False,
    skip_bad: bool = False,
    progress: bool = False,
    rows_per_part: int = ROWS_PER_PART,
    part_bytes: int = PART_BYTES,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Write the Parquet dataset of ``source`` (an IEMOCAP_full_release folder) to the local folder ``out``, or
    under an ``s3://BUCKET/prefix`` or ``gs://BUCKET/prefix`` (``ObjectStoreFolder``: manifest written last).

    Returns the summary (also stored in the dataset, see ``read_summary``). ``timings``, if given, receives the
    wall seconds spent in ``parse``, ``decode``, ``features``, ``write`` and ``total``.
    """
    started = time.perf_counter()
    if rows_per_part < 1 or part_bytes < 1:
        raise ValueError(f"rows_per_part={rows_per_part!r}, part_bytes={part_bytes!r}: expected positive sizes")
    source, out = _source_and_out(source, out)
    clock = {"parse": 0.0, "decode": 0.0, "features": 0.0, "write": 0.0}
    # The lock and the target checks come first: a second run or a refused --out stops before any work. On object
    # storage the manifest (_common_metadata, which readers require) is written last instead of a rename.
    marker = f"{METADATA_FILE} with its summary"
    folder = (ObjectStoreFolder(out, writer="ser prepare", what="dataset", marker=marker, manifest=METADATA_FILE,
                                is_ours=is_dataset, overwrite=overwrite) if isinstance(out, str) else
              AtomicFolder(out, writer="ser prepare", what="dataset", marker=marker, is_ours=is_dataset,
                           overwrite=overwrite))
    filesystem = getattr(folder, "filesystem", None)
    # One BLAS thread: the per-utterance matrices are small, and on a busy machine OpenBLAS's spinning threads
    # made the mel projection ~100x slower (16 ms instead of 0.13 ms per 2 s utterance, measured here).
    with folder, threadpoolctl.threadpool_limits(1, user_api="blas"):
        tick = time.perf_counter()
        parsed = parse_iemocap(source, skip_bad=skip_bad, progress=progress)
        clock["parse"] += time.perf_counter() - tick
        if not parsed.utterances:
            raise DataError(source, "no utterance with a 4-class label (angry, happy/excited, neutral, sad) was "
                            "found" + (f"; {len(parsed.skipped)} input(s) skipped as bad" if parsed.skipped else ""))
        schema = dataset_schema(features=features)
        writer = _PartWriter(folder.partial, schema, rows_per_part, part_bytes, filesystem)
        done = _encode(parsed, writer, features=features, skip_bad=skip_bad, progress=progress, clock=clock)
        if not done["kept"]:
            raise DataError(source, f"every utterance was skipped as bad ({len(done['skipped'])} inputs); nothing "
                                    "to write")
        tick = time.perf_counter()
        writer.flush()
        summary = _summary(
            source=source, out=out, utterances=done["kept"], seconds=done["seconds"], parse_dropped=parsed.dropped,
            skipped=done["skipped"], resampled=+done["resampled"], downmixed=done["downmixed"], features=features,
            schema=schema, parts=writer.parts, rows_per_part=rows_per_part,
        )
        metadata = dict(schema.metadata or {})
        metadata[SUMMARY_KEY] = json.dumps(summary, sort_keys=True).encode()
        pq.write_metadata(schema.with_metadata(metadata), f"{folder.partial}/{METADATA_FILE}", filesystem=filesystem)
        folder.commit()
        clock["write"] += time.perf_counter() - tick
    if timings is not None:
        timings.update(clock, total=time.perf_counter() - started)
    return summary
