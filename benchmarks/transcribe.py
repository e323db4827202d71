"""Transcription cost of `ser transcribe` in process: utterances per second of ``transcribe.Recognizer`` (the
automatic-speech-recognition pipeline) over the first ``--utterances`` rows of a dataset, at a few batch sizes and
thread counts, measured in one run so the ratios compare like with like.

The default model is the tiny offline Whisper (``--model tiny``: random weights, 16 tokens per utterance at
most): its figures measure the pipeline's own cost (feature extraction to Whisper's 30 s window, the encoder,
greedy decoding), not a real checkpoint's. ``--model NAME`` times a real one on a machine that has it; its
decoding stops at end-of-text, so the cost per utterance depends on what was said.

    python benchmarks/transcribe.py                           # demo corpus (built here, ~1 min), CPU
    python benchmarks/transcribe.py --dataset DS --device cuda --model openai/whisper-large-v3
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.tracking import git_commit  # noqa: E402

SETTINGS = ((1, 1), (8, 1), (8, 0))  # (batch size, threads; 0 = torch's default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="Parquet dataset (default: the synthetic demo corpus, built here)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--utterances", type=int, default=96, help="rows timed per setting (default 96)")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch

    from ser_platform.demo import demo_or_given
    from ser_platform.transcribe import Recognizer, RecognizerSpec

    with tempfile.TemporaryDirectory(prefix="ser-transcribe-") as tmp:
        dataset, corpus = demo_or_given(args.dataset, tmp)
        table = pq.read_table(dataset, columns=["audio", "duration"]).slice(0, args.utterances)
    audio = table.column("audio").to_pylist()
    seconds = sum(table.column("duration").to_pylist())
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {os.cpu_count()} logical CPUs"
    print(f"device: {device}; torch default threads {torch.get_num_threads()}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, git {git_commit()}")
    print(f"data: {corpus}; first {len(audio)} utterances, {seconds:.1f} s of audio "
          f"({seconds / len(audio):.2f} s mean)")
    print(f"model: {args.model}")
    print()
    print("| batch size | threads | wall s | utterances/s | audio s per wall s |")
    print("|---:|---:|---:|---:|---:|")
    rates = {}
    for batch_size, threads in SETTINGS:
        recognizer = Recognizer(RecognizerSpec(args.model, device=args.device, batch_size=batch_size,
                                               threads=threads))
        recognizer.transcribe(audio[:2])  # warm-up: lazy imports, first allocations
        started = time.perf_counter()
        texts = recognizer.transcribe(audio)
        wall = time.perf_counter() - started
        assert len(texts) == len(audio)
        rates[(batch_size, threads)] = len(audio) / wall
        shown = threads or torch.get_num_threads()
        print(f"| {batch_size} | {shown}{'' if threads else ' (default)'} | {wall:.1f} | "
              f"{len(audio) / wall:.1f} | {seconds / wall:.1f} |")
    print()
    base = rates[SETTINGS[0]]
    for setting in SETTINGS[1:]:
        print(f"batch {setting[0]}, threads {setting[1] or 'default'}: {rates[setting] / base:.2f}x the utterances/s "
              f"of batch {SETTINGS[0][0]}, threads {SETTINGS[0][1]} (same run)")


if __name__ == "__main__":
    main()
