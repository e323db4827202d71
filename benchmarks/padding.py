"""Padding fraction of training batches with and without ``data.bucket_by_length`` (cheap, CPU, no model).

The demo preset's data on the synthetic demo corpus (60 kept utterances per session, seed 0: what the embedded
default trains on): for each of the 5 loso5 folds and 3 epochs, the training split in a seeded random order is
cut into pools of ``POOL_BATCHES`` batches and planned by ``loader.plan_pool_batches`` exactly as
``loader.train_batches`` plans them (Ray's local shuffle buffer is replaced by a seeded permutation of the split).
Per batch: audio samples after cropping to ``data.max_audio_seconds`` (wav2vec2 frames and MFCC frames follow
the samples), and tokens of the demo's tokenizer (byte-level, one token per byte: RoBERTa's BPE gives ~4x fewer,
so its text padding fraction differs). Padding fraction = padded cells / all cells of the padded batch tensors,
over all batches.

    python benchmarks/padding.py                      # builds the demo corpus in a temp folder (~1 min)
    python benchmarks/padding.py --dataset PATH       # any Parquet dataset from `ser prepare`
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.tracking import git_commit  # noqa: E402


def padding_fraction(lengths_per_batch: list[np.ndarray]) -> float:
    cells = sum(len(b) * int(b.max()) for b in lengths_per_batch)
    valid = sum(int(b.sum()) for b in lengths_per_batch)
    return 1.0 - valid / cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="Parquet dataset (default: the synthetic demo corpus, built here)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch

    from ser_platform.config import load_config
    from ser_platform.data.folds import fold_spec
    from ser_platform.data.loader import POOL_BATCHES, plan_pool_batches
    from ser_platform.demo import demo_or_given
    from ser_platform.models.text import build_tokenizer
    from ser_platform.train import derive_seed

    config = load_config("demo")
    with tempfile.TemporaryDirectory(prefix="ser-padding-") as tmp:
        dataset, corpus = demo_or_given(args.dataset, tmp)
        table = pq.read_table(dataset, columns=["id", "speaker", "label", "transcript", "audio", "duration"])
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    max_samples = int(round(config.data.max_audio_seconds * config.data.sample_rate))
    samples = np.asarray([min(len(a), max_samples) for a in rows["audio"]])
    tokenizer = build_tokenizer(config.model.text)
    tokens = np.asarray([len(ids) for ids in tokenizer([str(t) for t in rows["transcript"]], truncation=True,
                                                        max_length=config.data.max_text_tokens)["input_ids"]])
    rows = {k: v for k, v in rows.items() if k != "audio"}
    rows["row"] = np.arange(len(samples))
    batch_size = config.train.batch_size

    print(f"device: CPU (no model is run), {os.cpu_count()} logical CPUs")
    print(f"torch {torch.__version__}, python {platform.python_version()}, git {git_commit()}")
    print(f"data: {corpus}; {len(samples)} utterances, audio {samples.mean() / 16000:.2f} s mean "
          f"({samples.min() / 16000:.2f}-{samples.max() / 16000:.2f} s), text {tokens.mean():.1f} tokens mean "
          f"({tokens.min()}-{tokens.max()}, demo byte-level tokenizer)")
    print(f"plan: demo preset, batch {batch_size}, pools of {POOL_BATCHES} batches, training splits of the 5 loso5 "
          f"folds x {args.epochs} epochs")
    print()
    print("| samples_per_class | bucket_by_length | batches | audio padding | text padding |")
    print("|---:|---|---:|---:|---:|")
    results = {}
    for per_class in (0, config.train.samples_per_class):
        for bucket in (False, True):
            audio, text = [], []
            for fold in range(1, 6):
                speakers = sorted(fold_spec(fold, config.data.protocol).train_speakers)
                keep = np.flatnonzero(np.isin(rows["speaker"], speakers))
                for epoch in range(1, args.epochs + 1):
                    seed = derive_seed(config.train.seed, fold, epoch, 0)
                    order = keep[np.random.default_rng(seed).permutation(len(keep))]
                    pool_rows = POOL_BATCHES * batch_size
                    pools = [{k: v[order[i:i + pool_rows]] for k, v in rows.items()}
                             for i in range(0, len(order), pool_rows)]
                    for batch in plan_pool_batches(pools, batch_size, samples_per_class=per_class,
                                                   bucket_by_length=bucket, seed=seed):
                        audio.append(samples[batch["row"]])
                        text.append(tokens[batch["row"]])
            results[(per_class, bucket)] = (padding_fraction(audio), padding_fraction(text))
            print(f"| {per_class} | {bucket} | {len(audio)} | {results[(per_class, bucket)][0]:.1%} | "
                  f"{results[(per_class, bucket)][1]:.1%} |")
    print()
    for per_class in (0, config.train.samples_per_class):
        (a0, t0), (a1, t1) = results[(per_class, False)], results[(per_class, True)]
        print(f"samples_per_class={per_class}: bucketing keeps {a1 / a0:.2f}x the audio padding and {t1 / t0:.2f}x "
              f"the text padding (ratios of padding fractions, same run)")


if __name__ == "__main__":
    main()
