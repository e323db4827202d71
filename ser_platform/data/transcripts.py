"""Recognised text in a dataset: where an ASR track lives, how it is read back (joined by utterance id), its word
error rate against the gold transcripts, and which text a run reads (``data.train_text_source``,
``data.test_text_source``).

Layout. A track is a folder inside the dataset, one per (model, revision), written whole (``TrackWriter``: in a
local folder an ``AtomicFolder``, a hidden partial folder renamed into place; on object storage an
``ObjectStoreFolder``, the metadata file written last and a track without it not listed; either way the dataset
never shows half a track, and a second model adds a folder of its own and leaves the others alone)::

    DATASET/_transcripts/<safe model name>@<revision>/part-00000.parquet   id string, text string
    DATASET/_transcripts/<safe model name>@<revision>/_common_metadata     schema + TRACK_KEY: the metadata (JSON)

The audio's part files are never rewritten: Parquet files cannot gain a column in place, so the "column" is this
sidecar, joined by ``id`` when a split is read (``TranscriptSwap``). Ray Data, pyarrow.dataset and
``parquet.check_dataset`` skip paths whose first component starts with ``_``, so readers of the dataset see
exactly the columns ``ser prepare`` wrote. ``ser prepare --overwrite`` replaces the whole folder, tracks
included: a track never outlives the audio it was recognised from.

Metadata (``TrackInfo.metadata``): ``model`` (the name or path as given), ``revision``, ``utterances``, the
recognition settings, ``seconds`` of audio and ``wall_seconds``, and ``wer`` (``wer_report``): word error rate
against the gold transcripts over all utterances, per session, per speaker and per loso5 fold (its test side and
its training side, train + validation speakers). Both texts are compared in ``overlap.normalise_transcript``'s
form (lower case, IEMOCAP's bracketed non-speech tokens and punctuation removed), since Whisper writes its own
punctuation and casing and IEMOCAP's transcripts theirs. A group's WER is corpus-level, as jiwer's: the
substitutions, deletions and insertions of its utterances over their reference words (an utterance whose gold
text normalises to nothing adds its hypothesis' words as insertions).

Text sources (config ``data.train_text_source`` for the training and validation splits,
``data.test_text_source`` for the test split): ``gold`` = the dataset's ``transcript`` column; ``asr`` = the
track of the config's ``data.asr_model``; ``asr:NAME`` or ``asr:NAME@REVISION`` = that track. ``NAME`` alone
selects the dataset's one track of that model (``find_track``: none, or several revisions, is an error listing
what there is).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ser_platform.data.atomic_folder import AtomicFolder, ObjectStoreFolder
from ser_platform.data.errors import DataError
from ser_platform.data.folds import all_folds, split_rows
from ser_platform.data.overlap import normalise_transcript, transcript_overlap

GOLD = "gold"
ASR = "asr"
TRACKS_DIR = "_transcripts"
TRACK_KEY = b"ser_platform.transcript_track"
TRACK_FILE = "part-00000.parquet"
METADATA_FILE = "_common_metadata"
TRACK_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("text", pa.string(), nullable=False)])
WER_PROTOCOL = "loso5"  # the folds the metadata lists (the paper's protocol); other protocols: fold_wer
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --- text sources --------------------------------------------------------------------------------------------

def is_text_source(value: str) -> bool:
    """``gold``, ``asr``, or ``asr:NAME`` / ``asr:NAME@REVISION`` with a non-empty NAME (module docstring)."""
    if value in (GOLD, ASR):
        return True
    ref = value[len(ASR) + 1:].strip()
    return value.startswith(ASR + ":") and bool(ref) and not ref.startswith("@") and not ref.endswith("@")


def track_ref(source: str, asr_model: str) -> str | None:
    """The track a text source reads, as ``NAME`` or ``NAME@REVISION``; None for ``gold``."""
    if source == GOLD:
        return None
    return asr_model if source == ASR else source[len(ASR) + 1:]


def split_model_ref(ref: str) -> tuple[str, str | None]:
    """``"NAME@REVISION"`` -> (NAME, REVISION); ``"NAME"`` -> (NAME, None). The revision follows the last ``@``."""
    name, at, revision = ref.strip().rpartition("@")
    return (name, revision) if at and name and revision else (ref.strip(), None)


# --- tracks: layout, writing, reading ------------------------------------------------------------------------

def track_folder_name(model: str, revision: str) -> str:
    """``<safe name>@<revision>``: a model name or path with every run of characters other than letters, digits,
    ``.``, ``_`` and ``-`` turned into ``--`` (``openai/whisper-small`` -> ``openai--whisper-small``)."""
    safe = _UNSAFE.sub("--", model).strip("-") or "model"
    return f"{safe}@{_UNSAFE.sub('--', revision)}"


@dataclass(frozen=True)
class TrackInfo:
    """One ASR track of a dataset: its folder and its metadata (module docstring)."""

    path: str
    metadata: Mapping[str, Any] = field(hash=False, compare=False)

    @property
    def model(self) -> str:
        return str(self.metadata["model"])

    @property
    def revision(self) -> str:
        return str(self.metadata["revision"])

    @property
    def ref(self) -> str:
        """``NAME@REVISION``: what ``asr:`` sources and ``data.asr_model`` name it by."""
        return f"{self.model}@{self.revision}"


def _join(dataset: str | Path, *parts: str) -> str:
    return "/".join([str(dataset).rstrip("/"), *parts])


def _filesystem(dataset: str | Path):
    from ser_platform.data.parquet import filesystem_and_path

    return filesystem_and_path(dataset)


def is_track(path: str | Path) -> bool:
    """Whether ``path`` holds a track ``TrackWriter`` wrote (the marker ``--overwrite`` requires)."""
    try:
        read_track_metadata(path)
    except DataError:
        return False
    return True


def read_track_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of the track folder ``path`` (local or a pyarrow URI); ``DataError`` naming it otherwise."""
    filesystem, root = _filesystem(path)
    try:
        schema = pq.read_schema(_join(root, METADATA_FILE), filesystem=filesystem)
    except (OSError, pa.ArrowException) as err:
        raise DataError(path, f"not a complete ASR track: cannot read its {METADATA_FILE} ({err}); re-run "
                              "`ser transcribe --overwrite`") from None
    try:
        return json.loads((schema.metadata or {})[TRACK_KEY])
    except (KeyError, ValueError):
        raise DataError(path, f"{METADATA_FILE} holds no {TRACK_KEY.decode()}: not written by `ser transcribe`"
                        ) from None


def list_tracks(dataset: str | Path) -> list[TrackInfo]:
    """The dataset's complete tracks, by folder name: hidden partial folders and lock files are not listed, nor
    (object storage) a track still being written, which has no metadata file yet."""
    from pyarrow import fs

    filesystem, root = _filesystem(dataset)
    filesystem = filesystem or fs.LocalFileSystem()
    selector = fs.FileSelector(_join(root, TRACKS_DIR), allow_not_found=True)
    found = []
    for info in sorted(filesystem.get_file_info(selector), key=lambda i: i.base_name):
        if info.type == fs.FileType.Directory and not info.base_name.startswith("."):
            metadata = filesystem.get_file_info(_join(root, TRACKS_DIR, info.base_name, METADATA_FILE))
            if metadata.type == fs.FileType.NotFound:
                continue
            where = _join(dataset, TRACKS_DIR, info.base_name)
            found.append(TrackInfo(where, read_track_metadata(where)))
    return found


def find_track(dataset: str | Path, ref: str) -> TrackInfo:
    """The track ``ref`` (``NAME`` or ``NAME@REVISION``) names; ``DataError`` naming the dataset, what was asked
    and what tracks it has, when there is none or (``NAME`` alone) several."""
    name, revision = split_model_ref(ref)
    tracks = list_tracks(dataset)
    matching = [t for t in tracks if t.model == name and revision in (None, t.revision)]
    if len(matching) == 1:
        return matching[0]
    have = ", ".join(t.ref for t in tracks) or "none"
    if not matching:
        raise DataError(dataset, f"no ASR track {ref!r} (tracks there: {have}); write it with `ser transcribe "
                                 f"--dataset {dataset} --model {name}`")
    raise DataError(dataset, f"{len(matching)} ASR tracks of model {name!r} ({have}): name one as NAME@REVISION")


class TrackWriter:
    """Writes one track into the dataset ``dataset`` as a whole (module docstring)::

        with TrackWriter(dataset, model, revision, overwrite=False) as writer:   # target checked (and locked)
            ...recognise...
            track = writer.commit(ids, texts, metadata)

    A local folder: an ``AtomicFolder`` (partial folder renamed into place). A URI (``s3://``, ``gs://``): an
    ``ObjectStoreFolder`` (no rename there: the texts first, the metadata file last, so ``list_tracks`` sees
    the track only once complete). An existing track of the same model and revision is replaced only with
    ``overwrite``; leaving the block without ``commit`` leaves no track behind."""

    def __init__(self, dataset: str | Path, model: str, revision: str, *, overwrite: bool = False):
        self.model, self.revision = model, revision
        name, marker = track_folder_name(model, revision), f"{METADATA_FILE} with its track metadata"
        if "://" in str(dataset):
            self.out: str | Path = _join(dataset, TRACKS_DIR, name)
            self.folder: Any = ObjectStoreFolder(self.out, writer="ser transcribe", what="ASR track", marker=marker,
                                                 manifest=METADATA_FILE, is_ours=is_track, overwrite=overwrite)
        else:
            self.out = Path(dataset) / TRACKS_DIR / name
            self.folder = AtomicFolder(self.out, writer="ser transcribe", what="ASR track", marker=marker,
                                       is_ours=is_track, overwrite=overwrite)

    def __enter__(self) -> "TrackWriter":
        filesystem = getattr(self.folder, "filesystem", None)
        if filesystem is not None and filesystem.type_name == "local":  # file:// URIs: folders must exist there
            filesystem.create_dir(self.folder.partial, recursive=True)
        self.folder.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.folder.__exit__(*exc)

    def commit(self, ids: Sequence[str], texts: Sequence[str], metadata: Mapping[str, Any]) -> TrackInfo:
        """Write the texts and the metadata, then move the track into place."""
        if len(ids) != len(texts) or len(set(ids)) != len(ids):
            raise ValueError(f"TrackWriter.commit: {len(ids)} ids ({len(set(ids))} distinct) for {len(texts)} texts")
        full = {**metadata, "model": self.model, "revision": self.revision, "utterances": len(ids)}
        table = pa.Table.from_arrays([pa.array(list(ids), pa.string()), pa.array(list(texts), pa.string())],
                                     schema=TRACK_SCHEMA)
        filesystem = getattr(self.folder, "filesystem", None)  # an ObjectStoreFolder's; None: a local folder
        pq.write_table(table, f"{self.folder.partial}/{TRACK_FILE}", compression="zstd", filesystem=filesystem)
        schema = TRACK_SCHEMA.with_metadata({TRACK_KEY: json.dumps(full, sort_keys=True).encode()})
        pq.write_metadata(schema, f"{self.folder.partial}/{METADATA_FILE}", filesystem=filesystem)  # last
        self.folder.commit()
        return TrackInfo(str(self.out), json.loads(json.dumps(full)))


def read_track_texts(track: TrackInfo) -> dict[str, str]:
    """id -> recognised text of a track; ``DataError`` naming the file if it is missing or unreadable."""
    filesystem, root = _filesystem(track.path)
    where = _join(track.path, TRACK_FILE)
    try:
        table = pq.read_table(_join(root, TRACK_FILE), filesystem=filesystem, schema=TRACK_SCHEMA)
    except (OSError, pa.ArrowException) as err:
        raise DataError(where, f"cannot read the ASR track ({err}); re-run `ser transcribe --overwrite`") from None
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))


# --- joining a track into a split ----------------------------------------------------------------------------

class TranscriptSwap:
    """Replace a batch's ``transcript`` column by a track's text, row by row through ``id``: the one place text is
    swapped, for the Ray path (``Dataset.map_batches(..., batch_format="pyarrow")``: the audio columns pass through
    untouched) and the in-process one (a dict of numpy columns, ``loader.LocalFolds``). A row the track lacks is a
    ``DataError`` naming the row and the track."""

    def __init__(self, texts: Mapping[str, str], source: str):
        self.texts = dict(texts)
        self.source = source

    def lookup(self, ids: Iterable[Any]) -> list[str]:
        out = []
        for row_id in ids:
            text = self.texts.get(str(row_id))
            if text is None:
                raise DataError(f"row {row_id}", f"the ASR track {self.source} has no text for it (recognised from "
                                                 "another dataset?); re-run `ser transcribe --overwrite`")
            out.append(text)
        return out

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, pa.Table):
            texts = pa.array(self.lookup(batch.column("id").to_pylist()), pa.string())
            return batch.set_column(batch.schema.get_field_index("transcript"), "transcript", texts)
        out = dict(batch)
        out["transcript"] = np.asarray(self.lookup(batch["id"]), dtype=object)
        return out


@dataclass(frozen=True)
class SplitTexts:
    """The text each split of a run reads: a ``TranscriptSwap`` or None (gold) for the training and validation
    splits (``train``) and for the test split (``test``)."""

    train: TranscriptSwap | None
    test: TranscriptSwap | None

    def for_split(self, split: str) -> TranscriptSwap | None:
        return self.test if split == "test" else self.train


def load_split_texts(dataset: str | Path, train_source: str, test_source: str, asr_model: str) -> SplitTexts | None:
    """The tracks a run's text sources name, read once (one ``TranscriptSwap`` per track); None when both are
    gold."""
    refs = {"train": track_ref(train_source, asr_model), "test": track_ref(test_source, asr_model)}
    if not any(refs.values()):
        return None
    swaps: dict[str, TranscriptSwap] = {}
    for ref in dict.fromkeys(r for r in refs.values() if r):
        track = find_track(dataset, ref)
        swaps[ref] = TranscriptSwap(read_track_texts(track), f"asr:{track.ref}")
    return SplitTexts(train=swaps.get(refs["train"] or ""), test=swaps.get(refs["test"] or ""))


# --- word error rate -----------------------------------------------------------------------------------------

def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> list[tuple[int, int]]:
    """Per utterance, (errors, reference words) of ``hypotheses`` against ``references``, both normalised
    (module docstring): errors = substitutions + deletions + insertions of jiwer's word alignment."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"word_errors: {len(references)} references, {len(hypotheses)} hypotheses")
    if not references:
        return []
    out = jiwer.process_words([normalise_transcript(t) for t in references],
                              [normalise_transcript(t) for t in hypotheses])
    counts = []
    for reference, chunks in zip(out.references, out.alignments):
        errors = 0
        for chunk in chunks:
            if chunk.type == "insert":
                errors += chunk.hyp_end_idx - chunk.hyp_start_idx
            elif chunk.type != "equal":  # substitute, delete: one error per reference word
                errors += chunk.ref_end_idx - chunk.ref_start_idx
        counts.append((errors, len(reference)))
    return counts


def _group(counts: Iterable[tuple[int, int]]) -> dict[str, Any]:
    counts = list(counts)
    errors, words = sum(e for e, _ in counts), sum(w for _, w in counts)
    return {"utterances": len(counts), "words": words, "errors": errors, "wer": errors / words if words else None}


def wer_report(rows: Mapping[str, Sequence[Any]], counts: Sequence[tuple[int, int]],
               protocol: str = WER_PROTOCOL) -> dict[str, Any]:
    """WER (module docstring) over all utterances, per session, per speaker, and per fold of ``protocol`` (its
    test side and its training side: train + validation speakers). ``rows``: columns ``session`` and ``speaker``
    aligned with ``counts`` (``word_errors``)."""
    sessions, speakers = [str(s) for s in rows["session"]], [str(s) for s in rows["speaker"]]
    by = lambda keys, key: _group(c for k, c in zip(keys, counts) if k == key)  # noqa: E731
    folds = {}
    for spec in all_folds(protocol):
        split = split_rows(spec, {"speaker": speakers, "session": [int(s) for s in sessions]})
        folds[str(spec.fold)] = {"test": _group(counts[i] for i in split["test"]),
                                 "train": _group(counts[i] for i in split["train"] + split["val"])}
    return {"all": _group(counts), "protocol": protocol,
            "sessions": {s: by(sessions, s) for s in sorted(set(sessions))},
            "speakers": {s: by(speakers, s) for s in sorted(set(speakers))}, "folds": folds}


def fold_wer(report: Mapping[str, Any], protocol: str, folds: Sequence[int], side: str) -> float | None:
    """The mean over ``folds`` of ``protocol`` of the WER of each fold's ``side`` ("test" or "train": train +
    validation speakers), pooled from the report's per-speaker counts; None if no fold has reference words."""
    from ser_platform.data.folds import fold_spec

    speakers = report["speakers"]
    values = []
    for fold in folds:
        spec = fold_spec(int(fold), protocol)
        members = spec.test_speakers if side == "test" else spec.train_speakers | spec.val_speakers
        pooled = _group((speakers[s]["errors"], speakers[s]["words"]) for s in members if s in speakers)
        if pooled["wer"] is not None:
            values.append(pooled["wer"])
    return float(np.mean(values)) if values else None


def _percent(group: Mapping[str, Any]) -> str:
    return "n/a" if group["wer"] is None else f"{100 * group['wer']:.1f} %"


def format_wer(report: Mapping[str, Any]) -> list[str]:
    """Lines: WER over all utterances, per session, per fold (test side, then training side)."""
    lines = [f"word error rate against the gold transcripts (normalised): {_percent(report['all'])} "
             f"({report['all']['errors']} errors / {report['all']['words']} words, {report['all']['utterances']} "
             "utterances)"]
    lines += [f"  session {s}: {_percent(g)} ({g['errors']}/{g['words']})" for s, g in report["sessions"].items()]
    lines += [f"  {report['protocol']} fold {k}: test {_percent(f['test'])}, training side {_percent(f['train'])}"
              for k, f in report["folds"].items()]
    return lines


# --- what a run's text sources give it: WER and the scripted overlap --------------------------------------------

GOLD_COLUMNS = ("id", "session", "speaker", "mode", "transcript")


def gold_rows(dataset: str | Path, columns: Sequence[str] = GOLD_COLUMNS) -> dict[str, list]:
    """The dataset's ``columns`` as lists (no audio read), local or a pyarrow URI; ``DataError`` naming it."""
    filesystem, root = _filesystem(dataset)
    try:
        table = pq.read_table(root, filesystem=filesystem, columns=list(columns))
    except (OSError, pa.ArrowException) as err:
        raise DataError(dataset, f"cannot read its {', '.join(columns)} columns ({err})") from None
    return table.to_pydict()


def run_text_scores(dataset: str | Path, train_source: str, test_source: str, asr_model: str, protocol: str,
                    folds: Sequence[int]) -> dict[str, float | None]:
    """For a run's text sources, the mean over ``folds`` of ``protocol`` of: the WER of the test text
    (``test_wer``) and of the training side's text (``train_wer``), None for gold (``fold_wer``), and the
    scripted overlap share of the text as the run reads it (``scripted_overlap``, ``run_text_overlap``)."""
    texts = load_split_texts(dataset, train_source, test_source, asr_model)
    overlap = run_text_overlap(gold_rows(dataset), texts, protocol)["folds"]
    shares = [overlap[str(f)]["scripted_overlap_share"] for f in folds]
    out: dict[str, float | None] = {"scripted_overlap": float(np.mean([v for v in shares if v is not None]))
                                    if any(v is not None for v in shares) else None}
    for side, source in (("train", train_source), ("test", test_source)):
        ref = track_ref(source, asr_model)
        out[f"{side}_wer"] = None if ref is None else fold_wer(find_track(dataset, ref).metadata["wer"], protocol,
                                                               folds, side)
    return out


def run_text_overlap(rows: Mapping[str, Sequence[Any]], texts: SplitTexts | None,
                     protocol: str = WER_PROTOCOL) -> dict[str, Any]:
    """``overlap.transcript_overlap`` on the text a run reads: per fold, the training side's transcripts from
    ``texts.train`` and the test side's from ``texts.test`` (gold where None). ``rows``: columns id, session,
    speaker, mode and the gold transcript. Same result shape as ``transcript_overlap``."""
    columns = {k: list(rows[k]) for k in ("id", "session", "speaker", "mode", "transcript")}
    if texts is None:
        return transcript_overlap(columns, protocol)
    gold = columns["transcript"]
    train = texts.train.lookup(columns["id"]) if texts.train else gold
    test = texts.test.lookup(columns["id"]) if texts.test else gold
    folds = {}
    for spec in all_folds(protocol):
        tested = set(split_rows(spec, columns)["test"])
        mixed = {**columns, "transcript": [test[i] if i in tested else train[i] for i in range(len(gold))]}
        folds[str(spec.fold)] = transcript_overlap(mixed, protocol)["folds"][str(spec.fold)]
    shares = ("overlap_share", "scripted_overlap_share", "improvised_overlap_share")
    mean = {}
    for key in shares:
        defined = [f[key] for f in folds.values() if f[key] is not None]
        mean[key] = float(np.mean(defined)) if defined else None
    return {"protocol": protocol, "folds": folds, "mean": mean}
