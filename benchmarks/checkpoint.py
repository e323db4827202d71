"""Bytes of a fold's per-epoch checkpoint at the paper's sizes: what it holds now against what it held before.

Before (issue 17): every epoch's checkpoint held the whole model, Adam's state and a second copy of the best
weights, all in fp32. Now (``train.py``'s ``state_fn``): the weights without frozen parameters, Adam's state (a
resume needs it), and the best epoch's weights only when that epoch is not the checkpoint's own (else a flag:
one copy serves both), in bf16 under ``train.precision`` bf16 (the paper preset's); ``train.checkpoint_every``
thins the epochs that write one, and Ray Train keeps only the latest (``CheckpointConfig(num_to_keep=1)``).

How: ``train.fit_folds`` (the plain-torch loop every Ray Train worker runs) on the paper preset's model with
random weights (``SERModel(..., pretrained=False)``: roberta-large and wav2vec2-base from their published
configs, no download), one fold, a few epochs of two 1-s utterances per split on the CPU; a hook saves each
epoch's checkpoint as the Ray Train worker does (``torch.save`` of ``state_fn()``) and, beside it, the payload
the old code saved (the module's whole state dict twice and the optimizer's), and prints both sizes and the
seconds each took to write. ``--s3 s3://bucket/prefix`` also uploads both files (pyarrow's S3 filesystem, which
honours ``AWS_ENDPOINT_URL``), prints the upload seconds and deletes them; ``--local-s3`` does so on an
S3-compatible server it starts on 127.0.0.1 (moto's, as the tests use). The files are uploaded one at a time once
training has ended and its model and optimizer are freed: at the paper's sizes the model, Adam's state and
pyarrow's buffered parts of a 7 GB upload did not fit this 24 GiB machine together (a GPU node holds the model on
the GPU). Moto keeps each object in memory several times over, so at the paper's sizes (gigabytes per file) use a
server that writes to disk and ``--s3``, e.g. rclone's ``serve s3`` as BENCHMARKS.md does. Each upload's stored
size is checked against the file's. ``--encoders frozen``: RoBERTa and wav2vec2 frozen (``model.encoders``),
whose weights the checkpoint no longer holds.

    python benchmarks/checkpoint.py                                  # paper sizes: ~16 GB of memory, ~3 min
    python benchmarks/checkpoint.py --encoders frozen --local-s3     # frozen encoders, uploads to moto timed
    python benchmarks/checkpoint.py --small --s3 s3://bucket/prefix  # tiny encoders, your bucket
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.config import load_config  # noqa: E402
from ser_platform.tracking import git_commit  # noqa: E402
from ser_platform.train import Hooks, fit_folds  # noqa: E402

from memory import SMALL  # noqa: E402  (benchmarks/ is on sys.path: scripts run as python benchmarks/x.py)

MIB = 2**20


def batches(config, *, utterances: int = 2, seconds: float = 1.0, tokens: int = 16):
    """``batches_for`` of random inputs in the collate's layout (no tokenizer, no corpus: nothing to download)."""
    from ser_platform.data.iemocap import CLASSES

    vocab = 250  # inside every text encoder's vocabulary (the tiny one is byte-level)
    samples = int(seconds * config.data.sample_rate)

    def batch(fold: int, split: str, epoch: int) -> dict:
        generator = torch.Generator().manual_seed(100 * fold + 3 * epoch + ("train", "val", "test").index(split))
        return {"input_values": 0.1 * torch.randn(utterances, samples, generator=generator),
                "audio_lengths": torch.full((utterances,), samples, dtype=torch.long),
                "input_ids": torch.randint(5, vocab, (utterances, tokens), generator=generator),
                "attention_mask": torch.ones(utterances, tokens, dtype=torch.bool),
                "labels": torch.arange(utterances) % len(CLASSES),
                "ids": [f"{split}{i}" for i in range(utterances)], "mode": ["impro"] * utterances,
                "mfcc": None, "spectrogram": None, "feature_lengths": None}

    return lambda fold, split, epoch: [batch(fold, split, epoch)]


class Measure(Hooks):
    """At each epoch's end: the checkpoint as the Ray Train worker writes it, and the old payload, timed."""

    def __init__(self, folder: Path, models: list, s3: str | None):
        self.folder, self.models, self.s3 = folder, models, s3
        self.rows: list[dict] = []

    def on_epoch_end(self, fold, epoch, metrics, state_fn) -> None:
        if state_fn is None:
            return
        row = {"epoch": epoch}
        started = time.perf_counter()
        state = state_fn()
        row["best is this epoch"] = state["best"].get("is_current", False)
        row["now"] = self._write(state, f"now-{epoch}.pt", started)
        model = self.models[-1]  # the fold's model (fit_folds builds it through ``build_model``)
        started = time.perf_counter()
        old = {"model": model.state_dict(), "optimizer": state["optimizer"],  # the same Adam state as now
               "best": {k: v.clone() for k, v in model.state_dict().items()}}
        row["before"] = self._write(old, f"before-{epoch}.pt", started)
        del old, state
        self.rows.append(row)

    def _write(self, payload: dict, name: str, started: float) -> dict:
        path = self.folder / name
        torch.save(payload, path)
        out = {"bytes": path.stat().st_size, "write_s": time.perf_counter() - started}
        if self.s3:
            out["path"] = path  # uploaded by upload_all once training has ended
        else:
            path.unlink()
        return out

    def upload_all(self) -> None:
        """Upload every file kept by ``_write`` to ``self.s3``, one at a time, timed; check, delete, unlink."""
        from pyarrow import fs

        filesystem, prefix = fs.FileSystem.from_uri(self.s3)
        for row in self.rows:
            for out in (row["before"], row["now"]):
                path = out.pop("path")
                key = f"{prefix}/{path.name}"
                # As on a worker, whose checkpoint is uploaded just after it was written: the file in the page
                # cache (not read back off the disk the local server writes to), and the previous upload's
                # writeback on that disk not this one's to pay.
                with open(path, "rb") as f:
                    while f.read(64 * MIB):
                        pass
                os.sync()
                started = time.perf_counter()
                fs.copy_files(str(path), key, destination_filesystem=filesystem)
                out["upload_s"] = time.perf_counter() - started
                stored = _stored_size(filesystem, key)
                if stored != out["bytes"]:  # a server that keeps something else timed something else
                    raise SystemExit(f"checkpoint.py: {self.s3}/{path.name} holds {stored} bytes after the upload, "
                                     f"not {out['bytes']}: the S3 server at "
                                     f"{os.environ.get('AWS_ENDPOINT_URL', 'AWS')} stored the upload differently (a "
                                     "server without aws-chunked support needs "
                                     "AWS_REQUEST_CHECKSUM_CALCULATION=when_required)")
                filesystem.delete_file(key)  # timed, then gone: gigabytes each, nothing left behind
                path.unlink()


def _return_freed_memory() -> None:
    """Hand the heap that freed tensors leave back to the OS (glibc keeps it: its mmap threshold rises as large
    blocks are freed, so later ones come from the heap), so that the uploads get the page cache a worker has."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
        pass


def _resident_gib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return float("nan")


def _stored_size(filesystem, path: str, wait_s: float = 600) -> int:
    """The object's size as the server reports it. A local server can stall for minutes after a multi-gigabyte
    upload (s3rver assembles the parts on its one thread) and pyarrow's client gives up on a request after
    seconds: ask again until ``wait_s`` has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return filesystem.get_file_info(path).size
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(5)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny encoders (seconds; the unit test runs it)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--encoders", choices=("finetune", "frozen"), default="finetune",
                        help="model.encoders: the paper's fine-tuning (default), or RoBERTa/wav2vec2 frozen")
    parser.add_argument("--s3", help="also upload each checkpoint under this s3:// URI, time it, delete it")
    parser.add_argument("--local-s3", action="store_true",
                        help="--s3 on an S3-compatible server started here on 127.0.0.1 (moto, as the tests use)")
    args = parser.parse_args(argv)
    if args.local_s3:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from support import MotoS3

        with tempfile.TemporaryDirectory(prefix="ser-bench-s3-") as folder, MotoS3(Path(folder)) as s3:
            os.environ.update(s3.env)  # pyarrow's S3 filesystem reads AWS_ENDPOINT_URL and the keys
            bucket = s3.create_bucket("ser-bench")
            return main([a for a in (argv if argv is not None else sys.argv[1:]) if a != "--local-s3"]
                        + ["--s3", f"{bucket}/checkpoints"])

    from ser_platform.models.ser_model import SERModel

    overrides = {"train.epochs": args.epochs, "train.batch_size": 2, "train.checkpoint_every": 1, "train.seed": 0,
                 "model.encoders": args.encoders, **(SMALL if args.small else {})}
    config = load_config("paper", overrides=overrides)
    models: list = []

    def build(cfg):
        models.append(SERModel(cfg.model, pretrained=False))
        return models[-1]

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ser-bench-ckpt-") as tmp:
        hooks = Measure(Path(tmp), models, args.s3)
        fit_folds(config, [1], batches(config), hooks=hooks, build_model=build, log=None)
        total = sum(p.numel() for p in models[-1].parameters())
        trainable = sum(p.numel() for p in models[-1].parameters() if p.requires_grad)
        if args.s3:
            models.clear()  # the model (and with it its optimizer's state) freed before the uploads
            gc.collect()
            _return_freed_memory()
            print(f"resident before the uploads: {_resident_gib():.1f} GiB", file=sys.stderr)
            hooks.upload_all()
    print(f"device: CPU ({os.cpu_count()} logical CPUs); torch {torch.__version__}, python "
          f"{platform.python_version()}, git {git_commit()}; {time.perf_counter() - started:.0f} s")
    print(f"model: paper preset{' with --small encoders' if args.small else ''} (text {config.model.text.name}, "
          f"speech {config.model.speech.name}, encoders {config.model.encoders}, feature encoder "
          f"{'frozen' if config.model.speech.freeze_feature_encoder else 'trained'}): {total / 1e6:.1f}M parameters, "
          f"{trainable / 1e6:.1f}M trainable; fp32 weights, the best-so-far copy in "
          f"{'bf16' if config.train.precision == 'bf16' else 'fp32'} (train.precision {config.train.precision}), Adam; "
          f"1 fold, {args.epochs} epochs, a checkpoint every epoch")
    print()
    upload = " | before upload s | now upload s" if args.s3 else ""
    print(f"| epoch | best epoch is this one | before MiB | now MiB | now / before | before write s | now write s{upload} |")
    print("|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.s3 else ""))
    for r in hooks.rows:
        before, now = r["before"], r["now"]
        cells = [str(r["epoch"]), "yes" if r["best is this epoch"] else "no", f"{before['bytes'] / MIB:.1f}",
                 f"{now['bytes'] / MIB:.1f}", f"{now['bytes'] / before['bytes']:.2f}", f"{before['write_s']:.2f}",
                 f"{now['write_s']:.2f}"]
        if args.s3:
            cells += [f"{before['upload_s']:.2f}", f"{now['upload_s']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    return hooks.rows


if __name__ == "__main__":
    main()
