"""The bad-input suite (issue 15, item 6): one table, each case a command, how its input is damaged first, the
exit code and a fragment of the message. After every case, checked the same way:

* nothing outside the case's folder changed (its siblings, the working directory the suite started in);
* a command that failed changed nothing inside the folder either (nothing lost, nothing half-written), and one
  that succeeded changed only the outputs the case names;
* no partial folder, old copy or lock file is left anywhere in the folder;
* a failure is reported as one line (``ser CMD: error: ...``), never a traceback.

Cases run in this process through ``cli.main``, in the case's folder (a copy of Session1 of a tiny synthetic
corpus and its dataset), so the suite stays fast. ``run`` is the ``ser`` command line, or, for entry points
that no command calls yet (``check_dataset``, the cache's writer, ``check_audio_length``, the demo builder), a
function of the folder: exit code 2 then means it raised an error of the kinds ``cli.main`` reports in one
line with exit 2. Permission cases run without root's permission override (``no_dac``: tests and CI run as
root, which ignores chmod). Killed and interrupted runs need a real process: tests/e2e/test_bad_input_signals.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import io
import json
import os
import re
import resource
import shutil
import signal
import struct
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from ser_platform.cli import main
from ser_platform.config import ConfigError
from ser_platform.data.atomic_folder import AtomicFolder
from ser_platform.data.encoder_cache import EncoderKey, EntryWriter
from ser_platform.data.errors import DataError
from ser_platform.data.iemocap import parse_iemocap
from ser_platform.data.parquet import check_audio_length, check_dataset, is_dataset, prepare_dataset
from ser_platform.data.synthetic import write_synthetic_corpus
from ser_platform.demo import ensure_demo_dataset

PREPARE = ("prepare", "--source", "corpus", "--out", "out", "--json")
DEBRIS = re.compile(r"^\..*\.(partial|old)-|\.lock$")


@dataclass(frozen=True)
class Case:
    name: str
    run: tuple[str, ...] | Callable[[Path], object]  # `ser` arguments, run in the case's folder; or a function
    code: int  # the exit code expected
    message: str = ""  # a fragment of the output (stderr and stdout); {tmp}, {wav}, {trans}, {emo} are filled in
    setup: Callable[[Path], object] | None = None  # damages the folder first; may return a function run after
    writes: tuple[str, ...] = ()  # what a successful run may create, change or remove (relative; fnmatch)
    no_dac: bool = False  # without root's permission override: chmod applies


# --- damage ------------------------------------------------------------------------------------------------

def _victim(folder: Path, part: str) -> Path:
    """The files of the corpus' first kept utterance: its wav, transcription or EmoEvaluation file."""
    info = json.loads((folder / "victim.json").read_text())
    return folder / info[part]


def _write_wav(path: Path, samples: int, rate: int = 16000) -> None:
    t = np.arange(samples) / rate
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, subtype="PCM_16")


def _set_rate_in_header(path: Path, rate: int) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b"fmt ") + 12  # chunk id, size, format tag, channels, then the sample rate
    data[at:at + 4] = struct.pack("<I", rate)
    path.write_bytes(bytes(data))


def _declare_huge_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b"data") + 4
    data[at:at + 4] = struct.pack("<I", 0x7FFFFFF0)
    path.write_bytes(bytes(data))


def _edit(path: Path, change: Callable[[str], str], encoding: str = "utf-8") -> None:
    path.write_bytes(change(path.read_text()).encode(encoding))


def _first_line_of(path: Path, utt_id: str) -> str:
    return next(line for line in path.read_text().splitlines() if line.startswith(utt_id + " "))


def _repeat_transcript(folder: Path, text: str | None) -> None:
    trans = _victim(folder, "trans")
    line = _first_line_of(trans, _victim_id(folder))
    repeat = line if text is None else line.split("]: ", 1)[0] + "]: " + text
    trans.write_text(trans.read_text() + repeat + "\n")


def _victim_id(folder: Path) -> str:
    return json.loads((folder / "victim.json").read_text())["id"]


def _replace_by_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _chmod(path: Path, mode: int) -> None:
    path.chmod(mode)


def _read_only_dataset(folder: Path) -> None:
    for part in (folder / "ds").iterdir():
        part.chmod(0o444)
    (folder / "ds").chmod(0o555)


def _move_into(path: Path, folder: Path, *, name: str | None = None, mode: int = 0o755,
               corpus_marker: bool = True) -> None:
    """Move ``path`` into a new ``folder`` (as ``name``), then give the folder ``mode``."""
    folder.mkdir(parents=True)
    shutil.move(path, folder / (name or path.name))
    if not corpus_marker:
        (folder / (name or path.name) / ".ser_synthetic_corpus.json").unlink()
    folder.chmod(mode)


def _thesis(folder: Path, name: str = "thesis") -> None:
    (folder / name).mkdir()
    (folder / name / "thesis.tex").write_text("three years of work")


def _hold_lock(target: Path, what: str):
    """Another writer of ``target``, in progress (this process, another open file: flock conflicts)."""
    held = AtomicFolder(target, writer="ser prepare", what=what, marker="-", is_ours=lambda p: False,
                        overwrite=False).open()
    return held.abort


def _debris(folder: Path, name: str) -> None:
    for suffix in ("partial-otherhost-1-0badcafe", "partial-1a2b3c4d", f"partial-{os.uname().nodename}-1-00c0ffee"):
        (folder / f".{name}.{suffix}").mkdir()
        (folder / f".{name}.{suffix}" / "part-00000.parquet").write_bytes(b"half")


def _limit_file_size(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG (a full disk, simulated): only the soft limit, restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    def restore():
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    return restore


def _foreign_part(folder: Path) -> None:
    """A Parquet part file of another table (other columns) in place of one of ``ds``'s."""
    table = pa.table({"id": ["x"], "label": ["angry"], "audio": [[0.0, 0.1]]})
    pq.write_table(table, folder / "ds" / "part-00000.parquet")


def _cache_writers_fail(folder: Path) -> None:
    """As ``ser cache`` writes: one writer per (modality, layer), sharing key folders, aborted in creation order."""
    keys = [EncoderKey("text", "tiny", "tiny-abc", -1), EncoderKey("text", "tiny", "tiny-abc", 0),
            EncoderKey("speech", "tiny", "tiny-def", -1)]
    writers = [EntryWriter(folder / "ds.cache", key) for key in keys]
    try:
        writers[0].add("Ses01F_impro01_F000", np.zeros((3, 4), np.float32), 3)
        raise DataError("row Ses01F_impro01_F000", "the encoder failed (simulated)")
    finally:
        for writer in writers:
            writer.abort()


def _cache_disk_full(folder: Path) -> None:
    with EntryWriter(folder / "ds.cache", EncoderKey("speech", "tiny", "tiny-abc", -1)) as writer:
        writer.add("Ses01F_impro01_F000", np.random.default_rng(0).random((2000, 16), np.float32), 16000)
        writer.commit({})


def _two_cache_writers(folder: Path) -> None:
    key = EncoderKey("speech", "facebook/wav2vec2-base", "unknown", 6)
    with EntryWriter(folder / "ds.cache", key), EntryWriter(folder / "ds.cache", key):
        pass


def _demo(folder: Path) -> str:
    return ensure_demo_dataset(folder / "demo", utterances_per_session=8, progress=False)


def _damaged_demo(folder: Path) -> None:
    ensure_demo_dataset(folder / "demo", utterances_per_session=8, progress=False)
    (folder / "demo" / "parquet" / "part-00001.parquet").unlink()


# --- the table -----------------------------------------------------------------------------------------------

CASES = [
    # ser synth: --overwrite only on its own corpus; one writer; nothing left behind.
    Case("synth --overwrite onto a folder it did not write", ("synth", "thesis", "--overwrite",
         "--utterances-per-session", "8"), 2, "{tmp}/thesis: exists and is not a synthetic corpus written by "
         "`ser synth`", setup=_thesis),
    Case("synth onto a non-empty folder", ("synth", "thesis", "--utterances-per-session", "8"), 2,
         "already exists; pass --overwrite", setup=_thesis),
    Case("synth onto a file", ("synth", "victim.json", "--overwrite", "--utterances-per-session", "8"), 2,
         "victim.json: exists and is not a folder"),
    Case("synth under a file", ("synth", "victim.json/corpus", "--utterances-per-session", "8"), 2,
         "victim.json: is a file, not a folder"),
    Case("synth --overwrite onto its own corpus, removing a killed run's partial folders, whatever host or pid",
         ("synth", "corpus", "--overwrite", "--utterances-per-session", "8", "--seed", "3"), 0,
         "synthetic corpus written to {tmp}/corpus", setup=lambda f: _debris(f, "corpus"),
         writes=("corpus", ".corpus.partial-*")),
    Case("synth --overwrite through a symlink replaces the target, the link stays valid",
         ("synth", "link", "--overwrite", "--utterances-per-session", "8"), 0, "written to {tmp}/corpus",
         setup=lambda f: (f / "link").symlink_to("corpus"), writes=("corpus",)),
    Case("synth while another synth writes the same folder", ("synth", "new", "--utterances-per-session", "8"), 2,
         "{tmp}/new: another writer is writing this synthetic corpus now (`ser prepare`, pid",
         setup=lambda f: _hold_lock(f / "new", "synthetic corpus")),
    Case("synth into a read-only folder", ("synth", "ro/new", "--utterances-per-session", "8"), 2,
         "cannot write the synthetic corpus {tmp}/ro/new here (Permission denied)",
         setup=lambda f: (f / "ro").mkdir(mode=0o555), no_dac=True),
    Case("synth with too few utterances", ("synth", "new", "--utterances-per-session", "7"), 2,
         "utterances_per_session=7: need at least 8"),

    # ser prepare: output checks on resolved paths, overwrite only a dataset, one writer.
    Case("prepare --out inside --source through ..", ("prepare", "--source", "x/../corpus", "--out", "corpus/ds"), 2,
         "{tmp}/corpus/ds: is inside the source corpus {tmp}/corpus", setup=lambda f: (f / "x").mkdir()),
    Case("prepare --out inside --source through a symlink", ("prepare", "--source", "corpus", "--out", "link/ds"), 2,
         "is inside the source corpus {tmp}/corpus", setup=lambda f: (f / "link").symlink_to("corpus")),
    Case("prepare --out holding --source", ("prepare", "--source", "corpus", "--out", ".", "--overwrite"), 2,
         "{tmp}: holds the source corpus {tmp}/corpus"),
    Case("prepare --overwrite onto a folder it did not write", ("prepare", "--source", "corpus", "--out", "thesis",
         "--overwrite"), 2, "{tmp}/thesis: exists and is not a dataset written by `ser prepare`", setup=_thesis),
    Case("prepare onto a dataset without --overwrite", ("prepare", "--source", "corpus", "--out", "ds"), 2,
         "{tmp}/ds: already exists; pass --overwrite"),
    Case("prepare --overwrite through a symlinked dataset", ("prepare", "--source", "corpus", "--out", "link",
         "--overwrite", "--json"), 0, '"dataset": "{tmp}/ds"', setup=lambda f: (f / "link").symlink_to("ds"),
         writes=("ds",)),
    Case("prepare while another prepare writes the same --out", PREPARE, 2,
         "{tmp}/out: another writer is writing this dataset now (`ser prepare`, pid",
         setup=lambda f: _hold_lock(f / "out", "dataset")),
    Case("prepare removes a killed run's partial folders, whatever host or pid", PREPARE, 0, '"utterances": 8',
         setup=lambda f: _debris(f, "out"), writes=("out", ".out.partial-*")),
    Case("prepare into a read-only folder", ("prepare", "--source", "corpus", "--out", "ro/out"), 2,
         "cannot write the dataset {tmp}/ro/out here (Permission denied)",
         setup=lambda f: (f / "ro").mkdir(mode=0o555), no_dac=True),
    Case("prepare --overwrite onto a read-only dataset of its own", ("prepare", "--source", "corpus", "--out", "ds",
         "--overwrite"), 0, "Parquet dataset {tmp}/ds", setup=_read_only_dataset, no_dac=True, writes=("ds",)),
    Case("prepare onto a full disk (file size limit)", PREPARE, 2,
         "{tmp}/out: cannot write the dataset: file size limit exceeded", setup=lambda f: _limit_file_size(60_000)),
    Case("prepare --out on a store it cannot write", ("prepare", "--source", "corpus", "--out", "hdfs://host/ds"),
         2, "hdfs://host/ds: prepare writes a local folder, s3://BUCKET/prefix or gs://BUCKET/prefix, not hdfs://"),
    Case("prepare --source that is a file", ("prepare", "--source", "victim.json", "--out", "out"), 2,
         "{tmp}/victim.json: is not a folder"),

    # ser prepare: inputs checked where they enter.
    Case("a transcript that is not UTF-8", PREPARE, 2, "{trans}: line 1: not UTF-8 text (byte 0xe9",
         setup=lambda f: _edit(_victim(f, "trans"), lambda t: "café\n" + t, "latin-1")),
    Case("a transcript that is not UTF-8, --skip-bad", PREPARE + ("--skip-bad",), 0, "not UTF-8 text",
         setup=lambda f: _edit(_victim(f, "trans"), lambda t: "café\n" + t, "latin-1"), writes=("out",)),
    Case("a transcript with a UTF-8 byte-order mark", PREPARE, 0, '"utterances": 8',
         setup=lambda f: _edit(_victim(f, "trans"), lambda t: "\ufeff" + t), writes=("out",)),
    Case("an EmoEvaluation file that is not UTF-8", PREPARE, 2, "{emo}: line 1: not UTF-8 text",
         setup=lambda f: _edit(_victim(f, "emo"), lambda t: "% évaluation\n" + t, "latin-1")),
    Case("an id given two different transcripts", PREPARE, 2, "{trans}: lines ",
         setup=lambda f: _repeat_transcript(f, "Something else entirely.")),
    Case("the same transcript line twice", PREPARE, 0, '"utterances": 8', setup=lambda f: _repeat_transcript(f, None),
         writes=("out",)),
    Case("an unreadable transcript", PREPARE, 2, "{trans}: cannot read it (Permission denied",
         setup=lambda f: _chmod(_victim(f, "trans"), 0), no_dac=True),
    Case("an unreadable transcript, --skip-bad", PREPARE + ("--skip-bad",), 0, "Permission denied",
         setup=lambda f: _chmod(_victim(f, "trans"), 0), no_dac=True, writes=("out",)),
    Case("an unreadable EmoEvaluation file", PREPARE, 2, "{emo}: cannot read it (Permission denied",
         setup=lambda f: _chmod(_victim(f, "emo"), 0), no_dac=True),
    Case("an unreadable session folder", PREPARE, 2, "{tmp}/corpus/Session1/dialog/EmoEvaluation: cannot read it",
         setup=lambda f: _chmod(f / "corpus" / "Session1" / "dialog", 0), no_dac=True),
    Case("an unreadable wav", PREPARE, 2, "{wav}: cannot read it (Permission denied",
         setup=lambda f: _chmod(_victim(f, "wav"), 0), no_dac=True),
    Case("an unreadable wav folder, --skip-bad", PREPARE + ("--skip-bad",), 0, "Permission denied",
         setup=lambda f: _chmod(_victim(f, "wav").parent, 0), no_dac=True, writes=("out",)),
    Case("a wav shorter than the encoder's receptive field", PREPARE, 2,
         "{wav}: audio of 399 samples (24.9 ms at 16000 Hz) is shorter than the speech encoder's receptive field",
         setup=lambda f: _write_wav(_victim(f, "wav"), 399)),
    Case("a wav of exactly the receptive field, with features", PREPARE + ("--features",), 0, '"utterances": 8',
         setup=lambda f: _write_wav(_victim(f, "wav"), 400), writes=("out",)),
    Case("a short wav at another rate, judged after resampling", PREPARE, 2, "audio of 200 samples",
         setup=lambda f: _write_wav(_victim(f, "wav"), 100, rate=8000)),
    Case("a wav that is a FIFO", PREPARE, 2, "{wav}: is a FIFO, not a file",
         setup=lambda f: _replace_by_fifo(_victim(f, "wav"))),
    Case("a transcript that is a FIFO", PREPARE, 2, "{trans}: is a FIFO, not a file",
         setup=lambda f: _replace_by_fifo(_victim(f, "trans"))),
    Case("a wav that is a folder", PREPARE, 2, "{wav}: is a folder, not a file",
         setup=lambda f: (_victim(f, "wav").unlink(), _victim(f, "wav").mkdir())),
    Case("a wav that is a dangling symlink", PREPARE, 2, "{wav}: wav missing",
         setup=lambda f: (_victim(f, "wav").unlink(), _victim(f, "wav").symlink_to(f / "gone.wav"))),
    Case("a wav whose data chunk declares 2 GB", PREPARE, 2, "{wav}: truncated wav: the data chunk declares "
         "2147483632 bytes", setup=lambda f: _declare_huge_data(_victim(f, "wav"))),
    Case("a wav header claiming 1 Hz", PREPARE, 2, "{wav}: sample rate 1 Hz in its header",
         setup=lambda f: _set_rate_in_header(_victim(f, "wav"), 1)),
    Case("a wav that is a text file", PREPARE + ("--skip-bad",), 0, "corrupt wav",
         setup=lambda f: _victim(f, "wav").write_text("RIFF? no, a note"), writes=("out",)),

    # Config values, through the command that reads nothing else.
    Case("--set data.folds=1,7 with loso5", ("model-summary", "--set", "data.folds=1,7"), 2,
         "data.folds=(1, 7): expected fold numbers in 1..5"),
    Case("--set model.num_heads=0", ("model-summary", "--set", "model.num_heads=0"), 2,
         "model.num_heads=0: expected >= 1"),
    Case("--set model.text.name= (empty)", ("model-summary", "--set", "model.text.name="), 2,
         "model.text.name='': expected a checkpoint name"),
    Case("--set train.lr=inf", ("model-summary", "--set", "train.lr=inf"), 2, "train.lr=inf: expected a finite"),
    Case("--set train.lr=.nan", ("model-summary", "--set", "train.lr=.nan"), 2, "train.lr=nan: expected a finite"),
    Case("--set train.epochs=true", ("model-summary", "--set", "train.epochs=true"), 2,
         "train.epochs=True: expected an integer"),
    Case("--set model.focus_attention=2", ("model-summary", "--set", "model.focus_attention=2"), 2,
         "model.focus_attention=2: expected true or false"),
    Case("--set train.grad_clip=-5", ("model-summary", "--set", "train.grad_clip=-5"), 2,
         "train.grad_clip=-5.0: expected >= 0 (0 turns clipping off)"),
    Case("--set train.weight_decay=-1", ("model-summary", "--set", "train.weight_decay=-1"), 2,
         "train.weight_decay=-1.0: expected >= 0"),
    Case("--set train.gpus_per_worker=-1", ("model-summary", "--set", "train.gpus_per_worker=-1"), 2,
         "train.gpus_per_worker=-1.0: expected >= 0"),
    Case("--set sweep.metric=bogus", ("model-summary", "--set", "sweep.metric=bogus"), 2,
         "sweep.metric='bogus': expected one of ('val_ua_mean'"),
    Case("--set preset=paper", ("model-summary", "--set", "preset=paper"), 2,
         "preset='paper': presets are chosen only by --preset"),
    Case("--set with a value YAML cannot read", ("model-summary", "--set", "loss.alpha=[1"), 2,
         "loss.alpha='[1': not a value"),
    Case("--config with a key twice", ("model-summary", "--config", "c.yaml"), 2,
         "c.yaml: cannot read config: line 3: key 'epochs' given twice (first at line 2)",
         setup=lambda f: (f / "c.yaml").write_text("train:\n  epochs: 3\n  epochs: 30\n")),
    Case("--config naming another preset", ("model-summary", "--config", "c.yaml"), 2,
         "c.yaml: preset='paper': presets are chosen only by --preset",
         setup=lambda f: (f / "c.yaml").write_text("preset: paper\n")),
    Case("--config in Latin-1", ("model-summary", "--config", "c.yaml"), 2, "c.yaml: not UTF-8 text (byte 0xe9",
         setup=lambda f: (f / "c.yaml").write_bytes("tracking:\n  experiment: caf\xe9\n".encode("latin-1"))),
    Case("--config that is a folder", ("model-summary", "--config", "corpus"), 2,
         "corpus: cannot read config: is a folder"),
    Case("--config that is a FIFO", ("model-summary", "--config", "c.yaml"), 2, "c.yaml: cannot read config: is a "
         "FIFO", setup=lambda f: os.mkfifo(f / "c.yaml")),
    Case("--config with two documents", ("model-summary", "--config", "c.yaml"), 2,
         "c.yaml: cannot read config: line 2, column 1: expected a single document in the stream, but found "
         "another document",
         setup=lambda f: (f / "c.yaml").write_text("train: {epochs: 3}\n---\ntrain: {epochs: 4}\n")),
    Case("--config with a list at the top", ("model-summary", "--config", "c.yaml"), 2,
         "c.yaml: expected a mapping at the top level, got list",
         setup=lambda f: (f / "c.yaml").write_text("- train\n")),

    # A finished dataset, checked before any work starts (the lead calls check_dataset in train, sweep, cache).
    Case("a dataset whose part file is zero bytes", lambda f: check_dataset(f / "ds"), 2,
         "{tmp}/ds/part-00000.parquet: empty part file (0 bytes)",
         setup=lambda f: (f / "ds" / "part-00000.parquet").write_bytes(b"")),
    Case("a dataset whose part file is truncated", lambda f: check_dataset(f / "ds"), 2,
         "{tmp}/ds/part-00000.parquet: corrupt or truncated part file",
         setup=lambda f: (f / "ds" / "part-00000.parquet").write_bytes(
             (f / "ds" / "part-00000.parquet").read_bytes()[:-100])),
    Case("a dataset holding a foreign file", lambda f: check_dataset(f / "ds"), 2,
         "{tmp}/ds/notes.txt: not a part file of the dataset inside the dataset folder",
         setup=lambda f: (f / "ds" / "notes.txt").write_text("remember")),
    Case("a dataset holding a folder", lambda f: check_dataset(f / "ds"), 2, "{tmp}/ds/old: a folder inside",
         setup=lambda f: (f / "ds" / "old").mkdir()),
    Case("a dataset holding a FIFO named like a part", lambda f: check_dataset(f / "ds"), 2,
         "{tmp}/ds/part-00009.parquet: not a regular file inside", setup=lambda f: os.mkfifo(f / "ds" /
                                                                                              "part-00009.parquet")),
    Case("a dataset with a part deleted", lambda f: check_dataset(f / "ds"), 2,
         "{tmp}/ds/part-00000.parquet: part file missing (1 of the 1 parts",
         setup=lambda f: (f / "ds" / "part-00000.parquet").unlink()),
    Case("a dataset with a part it does not list", lambda f: check_dataset(f / "ds"), 2,
         "{tmp}/ds/part-00001.parquet: a part file the summary does not list",
         setup=lambda f: shutil.copy(f / "ds" / "part-00000.parquet", f / "ds" / "part-00001.parquet")),
    Case("a dataset with another dataset's part", lambda f: check_dataset(f / "ds"), 2,
         "{tmp}/ds/part-00000.parquet: its columns differ from the dataset's", setup=_foreign_part),
    Case("a dataset without its _common_metadata", lambda f: check_dataset(f / "ds"), 2,
         "{tmp}/ds: cannot read _common_metadata", setup=lambda f: (f / "ds" / "_common_metadata").unlink()),
    Case("a dataset given as a file:// URI, holding a foreign file", lambda f: check_dataset(f"file://{f}/ds"), 2,
         "{tmp}/ds/notes.txt: not a part file", setup=lambda f: (f / "ds" / "notes.txt").write_text("remember")),
    Case("a dataset path that does not exist", lambda f: check_dataset(f / "nowhere"), 2,
         "{tmp}/nowhere: does not exist"),
    Case("a dataset path that is a file", lambda f: check_dataset(f / "victim.json"), 2,
         "{tmp}/victim.json: is a file, not a dataset folder"),
    Case("an unreadable dataset folder", lambda f: check_dataset(f / "ds"), 2,
         "{tmp}/ds/_common_metadata: cannot read it (Permission denied",
         setup=lambda f: _chmod(f / "ds", 0), no_dac=True),
    Case("a dataset in a folder that cannot be searched", lambda f: check_dataset(f / "locked" / "ds"), 2,
         "{tmp}/locked/ds: cannot read it (Permission denied",
         setup=lambda f: _move_into(f / "ds", f / "locked", mode=0o600), no_dac=True),
    Case("a dataset with hidden files beside its parts (readers skip them)", lambda f: check_dataset(f / "ds"), 0,
         setup=lambda f: (f / "ds" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")),

    # The encoder cache's writer and the short-audio rule ser cache and predict share.
    Case("a failed cache run leaves no empty key folders", _cache_writers_fail, 2,
         "row Ses01F_impro01_F000: the encoder failed"),
    Case("a cache run onto a full disk (file size limit)", _cache_disk_full, 2,
         "layer=-1: cannot write the encoder-cache entry: file size limit exceeded",
         setup=lambda f: _limit_file_size(20_000)),
    Case("two cache writers of one entry", _two_cache_writers, 2,
         "layer=6: another writer is writing this encoder-cache entry now (`ser cache`, pid"),
    Case("a cache entry's place taken by a folder it did not write",
         lambda f: EntryWriter(f / "ds.cache", EncoderKey("text", "tiny", "r", -1)), 2,
         "layer=-1: exists and is not an encoder-cache entry written by `ser cache`",
         setup=lambda f: _move_into(f / "corpus", f / "ds.cache/text/tiny@r", name="layer=-1")),
    Case("a dataset row too short for the speech encoder", lambda f: check_audio_length(120, "row Ses01F_x_F000"), 2,
         "row Ses01F_x_F000: audio of 120 samples (7.5 ms at 16000 Hz)"),

    # Commands that read runs or train: a bad argument, a missing store or an unreachable tracking server fails
    # before any work, in one line (port 9 is discard, closed here: refused at once).
    Case("tables with an unreachable tracking server", ("tables", "--mlflow-uri", "http://127.0.0.1:9"), 2,
         "MLflow tracking server 'http://127.0.0.1:9' is unreachable"),
    Case("tables on a store that does not exist", ("tables", "--mlflow-uri", "sqlite:///nowhere/mlflow.db"), 2,
         "no MLflow store at sqlite:///{tmp}/nowhere/mlflow.db"),
    Case("predict with an unreachable tracking server",
         ("predict", "--run", "0123abcd", "--wav", "{wav}", "--text", "hi", "--mlflow-uri", "http://127.0.0.1:9"), 2,
         "MLflow tracking server 'http://127.0.0.1:9' is unreachable"),
    Case("predict with a CSV row that has no text cell", ("predict", "--run", "0123abcd", "--csv", "rows.csv"), 2,
         "rows.csv, line 3: no 'text' cell",
         setup=lambda f: (f / "rows.csv").write_text(f"wav,text\n{_victim(f, 'wav')},hello\n{_victim(f, 'wav')}\n")),
    Case("predict with a CSV that is not UTF-8", ("predict", "--run", "0123abcd", "--csv", "rows.csv"), 2,
         "rows.csv: not UTF-8 text", setup=lambda f: (f / "rows.csv").write_bytes("wav,text\na.wav,café\n".encode("latin-1"))),
    Case("train with an unreachable tracking server",
         ("train", "--dataset", "ds", "--folds", "1", "--mlflow-uri", "http://127.0.0.1:9"), 2,
         "MLflow tracking server 'http://127.0.0.1:9' is unreachable"),
    Case("train on a dataset with a deleted part", ("train", "--dataset", "ds", "--mlflow-uri", "sqlite:///m.db"), 2,
         "part file missing", setup=lambda f: next((f / "ds").glob("part-*")).unlink()),
    Case("sweep with an unreachable tracking server",
         ("sweep", "--experiment", "ablation", "--dataset", "ds", "--mlflow-uri", "http://127.0.0.1:9"), 2,
         "MLflow tracking server 'http://127.0.0.1:9' is unreachable"),
    Case("sweep --resume of a sweep that does not exist", ("sweep", "--resume", "--name", "nope"), 2,
         "--resume: no sweep named 'nope'"),
    Case("sweep of an experiment the catalogue does not have", ("sweep", "--experiment", "table9"), 2,
         "invalid choice: 'table9'"),
    Case("cache into the dataset's own folder", ("cache", "--dataset", "ds", "--out", "ds/cache"), 2,
         "the cache folder lies inside the dataset"),

    # The demo builder: replaces only what it wrote, rebuilds a damaged dataset.
    Case("the demo builder meets a corpus folder of the user's", _demo, 2,
         "{tmp}/demo/corpus: exists and is not a synthetic corpus written by `ser synth`",
         setup=lambda f: _move_into(f / "corpus", f / "demo", name="corpus", corpus_marker=False)),
    Case("the demo builder rebuilds a dataset with a deleted part", _demo, 0, setup=_damaged_demo,
         writes=("demo/parquet",)),
]


# --- running a case ----------------------------------------------------------------------------------------

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CAPABILITY_V3 = 0x20080522
_DAC_CAPS = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)


@contextlib.contextmanager
def without_dac_override():
    """Permission bits apply to this thread even as root: CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH leave the
    thread's effective capabilities (per thread on Linux) for the block and come back after; as another user,
    chmod applies anyway. Skips where capabilities cannot be changed."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(_CAPABILITY_V3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("running as root and capget() fails: cannot make chmod apply")
    saved = data[0].effective
    data[0].effective = saved & ~_DAC_CAPS
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: chmod would not apply")
    try:
        yield
    finally:
        data[0].effective = saved
        assert libc.capset(ctypes.byref(header), data) == 0


def snapshot(root: Path, *, recursive: bool = True) -> dict[str, tuple]:
    """Path -> what it is (files: size, mtime, mode; links: target; folders: mode). Folders' mtimes are left out:
    a tool may create and remove a hidden temporary entry in them."""
    found = {}
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for folder, dirs, files in walker:
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            found[str(path.relative_to(root))] = (
                (kind, os.readlink(path)) if kind == "link" else (kind, info.st_mode) if kind == "dir"
                else (kind, info.st_size, info.st_mtime_ns, info.st_mode))
    return found


def _fill(text: str, folder: Path) -> str:
    info = json.loads((folder / "victim.json").read_text())
    return text.format(tmp=folder, **{k: folder / v for k, v in info.items() if k != "id"})


def _run(case: Case, folder: Path) -> tuple[int, str]:
    """The exit code and everything printed. A function case: 2 for the errors cli.main reports as one line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if isinstance(case.run, tuple):
            code = main([_fill(arg, folder) for arg in case.run])
        else:
            try:
                case.run(folder)
                code = 0
            except (DataError, ConfigError, FileExistsError) as error:
                print(error, file=err)
                code = 2
            except Exception:
                traceback.print_exc(file=err)
                code = 1
    return code, err.getvalue() + out.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Session1 of a tiny synthetic corpus (8 kept utterances, 10 wavs), its dataset, and where its first kept
    utterance's files are; copied for every case."""
    root = tmp_path_factory.mktemp("bad_input_base")
    full = write_synthetic_corpus(root / "full", utterances_per_session=8, seed=7)
    shutil.copytree(full / "Session1", root / "corpus" / "Session1")
    shutil.copy(full / ".ser_synthetic_corpus.json", root / "corpus")
    shutil.rmtree(full)
    prepare_dataset(root / "corpus", root / "ds")
    u = parse_iemocap(root / "corpus").utterances[0]
    dialog = u.id.rsplit("_", 1)[0]
    victim = {"id": u.id, "wav": str(Path(u.wav_path).relative_to(root)),
              "trans": f"corpus/Session1/dialog/transcriptions/{dialog}.txt",
              "emo": f"corpus/Session1/dialog/EmoEvaluation/{dialog}.txt"}
    (root / "victim.json").write_text(json.dumps(victim))
    return root


def _restore_permissions(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, base: Path, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "case"
    shutil.copytree(base, folder, symlinks=True)
    start = Path.cwd()
    outside = {"siblings": snapshot(tmp_path.parent, recursive=False), "cwd": snapshot(start, recursive=False)}
    undo = case.setup(folder) if case.setup else None
    before = snapshot(folder)
    monkeypatch.chdir(folder)
    try:
        with without_dac_override() if case.no_dac else contextlib.nullcontext():
            code, printed = _run(case, folder)
        after = snapshot(folder)
    finally:
        if callable(undo):
            undo()  # e.g. the other writer finishes: its lock and partial folder go
        monkeypatch.chdir(start)
    _restore_permissions(folder)  # pytest's clean-up, and reading what was written

    assert code == case.code, printed
    assert _fill(case.message, folder) in printed, printed
    assert "Traceback" not in printed, printed
    if code == 2 and isinstance(case.run, tuple):
        assert printed.strip().splitlines()[-1].startswith(f"ser {case.run[0]}: error: "), printed
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    allowed = {p for p in changed if any(fnmatch.fnmatch(p, w) or fnmatch.fnmatch(p, w + "/*") for w in case.writes)}
    assert changed == (allowed if code == 0 else set()), sorted(changed - allowed)
    assert not [p for p in snapshot(folder) if DEBRIS.search(Path(p).name)], sorted(after)
    assert snapshot(tmp_path.parent, recursive=False) == outside["siblings"]
    assert snapshot(start, recursive=False) == outside["cwd"]
    if code == 0 and "out" in case.writes:
        check_dataset(folder / "out")  # what a successful prepare wrote is a complete dataset


def test_the_table_covers_at_least_a_case_per_kind():
    names = " ".join(c.name for c in CASES)
    for kind in ("symlink", "FIFO", "read-only", "full disk", "UTF-8", "unreadable", "receptive field",
                 "another writer", "partial", "twice", "part deleted", "foreign"):
        assert kind in names or kind in " ".join(c.message for c in CASES), kind
    assert len(CASES) == len({c.name for c in CASES})


def test_symlinked_dataset_is_replaced_at_its_target(base, tmp_path):
    """The link still points at a complete dataset, and no ``.link.old`` was left beside it."""
    folder = Path(shutil.copytree(base, tmp_path / "case", symlinks=True))
    (folder / "link").symlink_to("ds")
    old_rows = pq.read_metadata(folder / "ds" / "part-00000.parquet").num_rows
    summary = prepare_dataset(folder / "corpus", folder / "link", overwrite=True, features=True)
    assert (folder / "link").is_symlink() and os.readlink(folder / "link") == "ds"
    assert check_dataset(folder / "link")["features"] and summary["utterances"] == old_rows
    assert sorted(p.name for p in folder.iterdir()) == ["corpus", "ds", "link", "victim.json"]


def test_a_run_killed_between_the_two_renames_gets_its_old_dataset_back(base, tmp_path):
    folder = Path(shutil.copytree(base, tmp_path / "case", symlinks=True))
    before = check_dataset(folder / "ds")
    os.rename(folder / "ds", folder / ".ds.old-4242-0badcafe")  # killed after moving the old one aside
    with pytest.raises(FileExistsError, match="already exists"):  # put back first, then refused as any dataset
        prepare_dataset(folder / "corpus", folder / "ds")
    assert check_dataset(folder / "ds") == before and is_dataset(folder / "ds")
    assert not list(folder.glob(".ds.*"))
