"""What the cluster topology costs and gives, measured in one run on local multi-node Ray clusters.

Part "parallel": a cluster of the issue's shape (a head with no CPU for work, two worker nodes of 1 CPU each;
``support.LocalCluster``), the dataset and Ray's run storage on an S3-compatible server on 127.0.0.1 (moto), MLflow
through an `mlflow server` whose artifacts go to the same bucket. `ser train` runs one 5-fold configuration of
the demo preset (the embedded default's model and corpus: 60 utterances per session) twice, as a user runs it:

* serial: ``train.parallel_units=1`` (one TorchTrainer runs the five folds in turn: what the platform did before);
* parallel: ``train.parallel_units=0`` (auto: the two worker nodes hold two units, so the folds are dealt into two
  lanes, 1,3,5 and 2,4, one TorchTrainer each);

and prints both wall times and their ratio, the fold runs' start/end times (they overlap), and what moved
through the S3 server: the dataset (its objects' bytes; read once per run, timed here with pyarrow from the
same server) and, per epoch, the checkpoint each fold run uploads (its size and the seconds Ray Train took to
persist it, ``checkpoint_mb`` and ``checkpoint_seconds`` logged by the run itself).

Part "autoscale": a head alone (no CPU for work) whose autoscaler may start two 1-CPU worker nodes (Ray's fake
multi-node provider, ``support.fake_autoscaler_config``); a sweep asks for 2 trials at once. Prints the sweep's
concurrency decision as it printed it, the nodes alive over time (they start because trials wait) and the wall
time.

    python benchmarks/cluster.py                     # both parts (~15 min on 2 cores)
    python benchmarks/cluster.py --part parallel --epochs 3

The machine is shared (2 cores, other work beside): ratios from one run, absolute seconds only as context.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # support.py: the same local clusters and servers the tests start

from ser_platform.tracking import git_commit  # noqa: E402
from support import LocalCluster, MlflowServer, MotoS3, fake_autoscaler_config  # noqa: E402

from sweep import device_line  # noqa: E402  (benchmarks/ is on sys.path: scripts run as python benchmarks/x.py)

BUCKET = "ser-bench"


def ser(cluster: LocalCluster, env: dict, workdir: Path, *args: str, script: str | None = None) -> tuple[str, float]:
    """A command run as a user runs it on the cluster; its output and wall seconds (it must succeed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / script)] if script else [sys.executable, "-m", "ser_platform.cli"]
    started = time.perf_counter()
    run = subprocess.run(command + list(args), cwd=workdir, capture_output=True, text=True,
                         env={**cluster.env, **env, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return run.stdout, seconds


def dataset_read(s3: MotoS3, uri: str) -> tuple[int, float]:
    """Bytes of the dataset's objects and the seconds pyarrow takes to read it whole from the server."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    size = sum(s3.objects(BUCKET, uri.split(f"{BUCKET}/", 1)[1] + "/").values())
    filesystem, path = pafs.FileSystem.from_uri(uri)
    started = time.perf_counter()
    pq.read_table(path, filesystem=filesystem)
    return size, time.perf_counter() - started


def fold_report(mlflow_uri: str, experiment: str, wall_start: float) -> list[str]:
    """The fold runs' times (relative to the run's start) and their per-epoch checkpoint figures."""
    from mlflow import MlflowClient

    from ser_platform.ray_train import CHECKPOINT_MB, CHECKPOINT_SECONDS
    from ser_platform.tracking import schema

    client = MlflowClient(mlflow_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], f"tags.`{schema.ROLE_TAG}` = '{schema.ROLE_FOLD}'")
    lines, sizes, uploads = [], [], []
    for run in sorted(runs, key=lambda r: int(r.data.tags[schema.FOLD_TAG])):
        start, end = run.info.start_time / 1000 - wall_start, run.info.end_time / 1000 - wall_start
        lines.append(f"  fold {run.data.tags[schema.FOLD_TAG]}: {start:6.1f} s -> {end:6.1f} s "
                     f"(Train run {run.data.tags[schema.TRAIN_RUN_TAG]})")
        sizes += [m.value for m in client.get_metric_history(run.info.run_id, CHECKPOINT_MB)]
        uploads += [m.value for m in client.get_metric_history(run.info.run_id, CHECKPOINT_SECONDS)]
    if sizes:
        lines.append(f"  per epoch, through S3: one checkpoint of {sum(sizes) / len(sizes):.2f} MB uploaded in "
                     f"{sum(uploads) / len(uploads):.2f} s on average ({len(sizes)} epochs; max "
                     f"{max(uploads):.2f} s)")
    return lines


def part_parallel(root: Path, epochs: int) -> None:
    from ser_platform.data.parquet import prepare_dataset
    from ser_platform.data.synthetic import write_synthetic_corpus

    with MotoS3(root / "s3") as s3:
        os.environ.update(s3.env)
        s3.create_bucket(BUCKET)
        corpus = write_synthetic_corpus(root / "corpus" / "IEMOCAP_full_release", utterances_per_session=60, seed=0)
        dataset = f"s3://{BUCKET}/demo.parquet"
        started = time.perf_counter()
        prepare_dataset(corpus, dataset)
        print(f"ser prepare --out {dataset}: {time.perf_counter() - started:.1f} s")
        size, read_s = dataset_read(s3, dataset)
        print(f"dataset in the bucket: {size / 2**20:.2f} MB; read whole from the S3 server in {read_s:.2f} s "
              f"(each run reads it once, before training)")
        with MlflowServer(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", root / "mlflow",
                          artifacts=f"s3://{BUCKET}/mlflow", env={**os.environ, **s3.env}) as mlflow, \
                LocalCluster(root / "cluster", head_cpus=0, worker_cpus=(1, 1), env=s3.env) as cluster:
            print(f"cluster: {len(cluster.nodes())} nodes (head 0 CPU, 2 x 1 CPU), S3 {s3.endpoint}, MLflow "
                  f"{mlflow.uri}")
            walls = {}
            for label, units in (("serial", 1), ("parallel", 0)):
                args = ["train", "--dataset", dataset, "--storage", f"s3://{BUCKET}/{label}", "--mlflow-uri",
                        mlflow.uri, "--mlflow-experiment", label, "--epochs", str(epochs), "--set",
                        f"train.parallel_units={units}"]
                wall_start = time.time()
                output, walls[label] = ser(cluster, s3.env, root / label, *args)
                decided = [line for line in output.splitlines() if line.startswith("resources:")]
                print(f"{label}: ser train, 5 folds x {epochs} epochs, wall {walls[label]:.1f} s")
                for line in decided + fold_report(mlflow.uri, label, wall_start):
                    print(f"  {line.strip()}" if line.startswith("resources:") else line)
            print(f"parallel / serial wall time: {walls['parallel'] / walls['serial']:.3f}")


def part_autoscale(root: Path, training_sets: list[str]) -> None:
    from ser_platform.data.parquet import prepare_dataset
    from ser_platform.data.synthetic import write_synthetic_corpus

    corpus = write_synthetic_corpus(root / "as-corpus" / "IEMOCAP_full_release", utterances_per_session=8, seed=1)
    dataset = prepare_dataset(corpus, root / "as-corpus" / "parquet")["dataset"]
    with LocalCluster(root / "autoscale", autoscaling=fake_autoscaler_config("cpu1", {"CPU": 1}, 2)) as cluster:
        timeline: list[tuple[float, int]] = []
        done = threading.Event()
        started = time.perf_counter()

        def watch() -> None:
            while not done.is_set():
                try:
                    count = len(cluster.nodes())
                except OSError:
                    count = -1
                if not timeline or timeline[-1][1] != count:
                    timeline.append((time.perf_counter() - started, count))
                time.sleep(1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            output, wall = ser(cluster, {}, root / "as-run", "--trials", "2", "--max-concurrent", "2", "--folds", "1",
                               "--epochs", "1", "--dataset", dataset, "--storage", str(root / "as-runs"),
                               "--mlflow-uri", f"sqlite:///{root / 'as-mlflow.db'}", "--shared-filesystem",
                               *training_sets, script="experiments/sweep_loss_weights.py")
        finally:
            done.set()
            watcher.join()
    print("autoscaling cluster: a head with no CPU for work, up to 2 worker nodes of 1 CPU (fake multi-node provider)")
    for line in output.splitlines():
        if line.startswith("resources:"):
            print(f"  {line}")
    print("  nodes alive: " + ", ".join(f"{n} at {t:.0f} s" for t, n in timeline))
    print(f"  sweep of 2 trials x 1 fold x 1 epoch: wall {wall:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["parallel", "autoscale", "all"], default="all")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per fold in part parallel (demo preset: 5)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ser-bc-", dir="/tmp"))  # short: Ray's socket paths must fit
    print(device_line())
    print(f"torch {torch.__version__}, python {platform.python_version()}, git {git_commit()}")
    if args.part in ("parallel", "all"):
        part_parallel(root, args.epochs)
    if args.part in ("autoscale", "all"):
        tiny = {"model.embed_dim": 8, "model.num_heads": 2, "model.num_layers": 1, "train.batch_size": 8,
                "train.samples_per_class": 2, "data.max_audio_seconds": 1.0}
        part_autoscale(root, [arg for key, value in tiny.items() for arg in ("--set", f"{key}={value}")])
    print(f"(corpora, stores and logs in {root})")


if __name__ == "__main__":
    main()
