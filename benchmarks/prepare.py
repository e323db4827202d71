"""Throughput of `ser prepare --features`: audio seconds written per wall second, and where the time goes.

Writes a synthetic corpus (not timed), imports librosa's lazy submodules once (a one-off ~3 s the first
feature call would otherwise pay), then runs ``prepare_dataset(..., features=True)`` ``--repeats`` times with
its ``timings`` instrumentation (parse / decode / features / write) and reports the median run. For scale it
also times ``prepare_dataset`` without features, and the batched torch twin ``AcousticFeatures`` on the same
audio (what extracting features next to the model would cost instead of storing them), at
``--torch-threads`` intra-op threads: on this shared 2-core machine torch's default 2 threads made the twin
~16x slower than 1 thread (0.56 s vs 0.035 s for 16 x 3 s, measured under a load average of ~8), the same
oversubscription that made ``prepare`` pin BLAS to one thread. Prints a Markdown block for BENCHMARKS.md.

    python benchmarks/prepare.py                          # ~1 min on 2 cores
    python benchmarks/prepare.py --utterances-per-session 200 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.data.features import AcousticFeatures, FeatureParams, mfcc_librosa  # noqa: E402
from ser_platform.tracking import git_commit  # noqa: E402
from ser_platform.data.parquet import prepare_dataset  # noqa: E402
from ser_platform.data.synthetic import write_synthetic_corpus  # noqa: E402

STAGES = ("parse", "decode", "features", "write")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_prepare(corpus: Path, out: Path, features: bool) -> tuple[dict, dict]:
    timings: dict[str, float] = {}
    summary = prepare_dataset(corpus, out, features=features, overwrite=True, timings=timings)
    return summary, timings


def torch_twin_seconds(dataset: Path, batch_size: int, device: str) -> float:
    """Wall seconds for AcousticFeatures over every utterance of ``dataset``, in padded batches."""
    audio = [np.asarray(a, dtype=np.float32) for a in pq.read_table(dataset, columns=["audio"]).column("audio")
             .to_pylist()]
    module = AcousticFeatures(FeatureParams()).to(device)
    batches = []
    for start in range(0, len(audio), batch_size):
        chunk = audio[start : start + batch_size]
        lengths = torch.tensor([len(a) for a in chunk])
        padded = torch.zeros(len(chunk), int(lengths.max()))
        for i, a in enumerate(chunk):
            padded[i, : len(a)] = torch.from_numpy(a)
        batches.append((padded.to(device), lengths.to(device)))
    module(*batches[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        for padded, lengths in batches:
            module(padded, lengths)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances-per-session", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="batch of the torch twin")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads for the twin")
    parser.add_argument("--workdir", help="where to write the corpus and datasets (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ser-bench-prepare-"))
    try:
        corpus = write_synthetic_corpus(workdir / "corpus", utterances_per_session=args.utterances_per_session,
                                        seed=0, overwrite=True)
        mfcc_librosa(np.zeros(1600, np.float32))  # librosa's lazy imports, once

        featured, plain = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            featured.append(run_prepare(corpus, workdir / "featured", features=True))
            plain.append(run_prepare(corpus, workdir / "plain", features=False))
        summary = featured[0][0]
        audio_seconds = summary["seconds"]
        median_f = sorted(featured, key=lambda r: r[1]["total"])[len(featured) // 2][1]
        median_p = sorted(plain, key=lambda r: r[1]["total"])[len(plain) // 2][1]
        twin = statistics.median(torch_twin_seconds(workdir / "featured", args.batch_size, args.device)
                                 for _ in range(args.repeats))
        size_f = sum(p.stat().st_size for p in (workdir / "featured").iterdir()) / 2**20
        size_p = sum(p.stat().st_size for p in (workdir / "plain").iterdir()) / 2**20
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({cpu_name()})"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    stage_f = " / ".join(f"{median_f[s] / median_f['total']:.0%}" for s in STAGES)
    stage_p = " / ".join(f"{median_p[s] / median_p['total']:.0%}" for s in STAGES)
    print(f"device: {device}, {os.cpu_count()} logical CPUs, load average {load} (shared machine: noisy)")
    print(f"torch {torch.__version__}, python {platform.python_version()}, git {git_commit()}")
    print(f"corpus: {summary['utterances']} utterances, {audio_seconds:.1f} s of audio "
          f"(synthetic, {args.utterances_per_session} per session), median of {args.repeats} runs")
    print()
    print("| run | audio s per wall s | parse / decode / features / write | dataset size |")
    print("|---|---:|---|---:|")
    print(f"| `prepare_dataset(features=True)` | {audio_seconds / median_f['total']:.0f} | {stage_f} "
          f"| {size_f:.0f} MiB |")
    print(f"| `prepare_dataset(features=False)` | {audio_seconds / median_p['total']:.0f} | {stage_p} "
          f"| {size_p:.0f} MiB |")
    print(f"| its librosa feature stage alone | {audio_seconds / median_f['features']:.0f} | | |")
    print(f"| `AcousticFeatures` torch twin, batch {args.batch_size}, {args.device}, {args.torch_threads} thread(s) "
          f"| {audio_seconds / twin:.0f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
