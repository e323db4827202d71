"""The Python steps of benchmarks/gpu_check.sh, and the markdown block it ends with.

    python benchmarks/gpu_check.py versions            # driver, CUDA, cuDNN, GPU, torch / Ray / transformers
    python benchmarks/gpu_check.py ray-train [--cpu]   # Ray Train, one worker on one GPU, nccl (--cpu: gloo)
    python benchmarks/gpu_check.py report LOG_DIR      # the markdown block, from the steps' logs

``ray-train`` joins $RAY_ADDRESS when it is set (the tests' session cluster), else starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.tracking import git_commit  # noqa: E402

GIB = 2**30


def versions() -> None:
    import ray
    import torch
    import transformers

    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        print(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    else:
        print("nvidia-smi: absent (no NVIDIA driver here)")
    if torch.cuda.is_available():
        print(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
              f"GPU {torch.cuda.get_device_name()}, total memory as torch sees it "
              f"{torch.cuda.get_device_properties(0).total_memory / GIB:.1f} GiB")
    else:
        print(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}, no GPU visible")
    print(f"ray {ray.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"git {git_commit()}")


def train_loop(config: dict) -> dict:
    """One Ray Train worker: an all-reduce over the process group Ray set up, on the worker's device."""
    import ray.train.torch
    import torch
    import torch.distributed as dist

    device = ray.train.torch.get_device()
    value = torch.full((1,), 2.0, device=device)
    dist.all_reduce(value)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"backend": dist.get_backend(), "device": str(device), "device_name": name,
            "world_size": dist.get_world_size(), "all_reduce": value.item()}


def ray_train(use_gpu: bool) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="gpu-check-ray-")
    try:
        trainer = TorchTrainer(
            train_loop, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                         resources_per_worker=None if use_gpu else {"CPU": 0.5}),
            run_config=RunConfig(name="gpu-check", storage_path=storage),
        )
        result = trainer.fit()
        print(f"ray-train: {json.dumps(result.return_value)}")
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)


def log_lines(log_dir: Path, step: str, pattern: str) -> list[str]:
    path = log_dir / f"{step}.log"
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]


def first_number(lines: list[str], pattern: str) -> float | None:
    for line in lines:
        match = re.search(pattern, line)
        if match:
            return float(match.group(1))
    return None


def report(log_dir: Path) -> None:
    """The markdown block: each step's status and seconds, then the figures each step printed."""
    status_file = log_dir / "status"  # name, exit status, seconds, note: tab-separated (gpu_check.sh)
    status = [line.split("\t") for line in status_file.read_text().splitlines()] if status_file.exists() else []
    print("### GPU check (`bash benchmarks/gpu_check.sh`" + (" --dry-run" if (log_dir / "dry-run").exists() else "")
          + ")\n")
    print("```")
    for line in log_lines(log_dir, "versions", r"."):
        print(line)
    print("```\n")
    print("| step | exit | seconds | note |\n|---|---:|---:|---|")
    for name, code, seconds, note in status:
        print(f"| {name} | {code} | {seconds} | {note} |")
    print()
    figures = {
        "ray-train": r"^ray-train:",
        "throughput": r"step time median|throughput:|MFU:|FLOPs per step|^model:|^batches:",
        "peak-memory": r"peak memory allocated|^batches:",
        "attention-sdpa": r"fwd\+bwd median|time ratio|^sizes:",
        "attention-flex": r"fwd\+bwd median|time ratio|^sizes:",
        "cache": r"^done in|rows\)",
    }
    for step, pattern in figures.items():
        lines = log_lines(log_dir, step, pattern)
        if lines:
            print(f"- **{step}**: " + "; ".join(lines))
    measured = first_number(log_lines(log_dir, "peak-memory", r"peak memory allocated"), r"allocated: ([\d.]+) GiB")
    predicted_path = log_dir / "predicted.json"
    if predicted_path.exists():
        row = json.loads(predicted_path.read_text())[0]
        print(f"- **predicted peak** (benchmarks/memory.py, {row['variant']}, {row['seconds']:g} s, {row['tokens']} "
              f"tokens, batch {row['batch']}): {row['peak'] / GIB:.1f} GiB"
              + (f"; measured {measured:.1f} GiB, measured / predicted = {measured * GIB / row['peak']:.2f}"
                 if measured else "; no CUDA peak measured (no GPU)"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions")
    train = sub.add_parser("ray-train")
    train.add_argument("--cpu", action="store_true", help="gloo on the CPU (the dry run)")
    summary = sub.add_parser("report")
    summary.add_argument("log_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "versions":
        versions()
    elif args.command == "ray-train":
        ray_train(use_gpu=not args.cpu)
    else:
        report(args.log_dir)


if __name__ == "__main__":
    main()
