"""Ray Data + Ray Train ingest vs an in-process torch DataLoader over the same Parquet, same model, one run.

Part "ingest" (default): fold 1's training split of a synthetic dataset, the same batch size, class-balanced
batch plan, collate and model, one torch thread everywhere. Epoch times (median of the epochs after the first):

* in-process: ``pyarrow`` reads the split once, a ``torch.utils.data.DataLoader`` (no worker processes) with
  ``plan_batches`` as its batch sampler and the same collate feeds ``train.train_epoch``;
* Ray, materialised: one ``TorchTrainer`` worker reads ``get_dataset_shard`` of the split held in the object store;
* Ray, streaming: the same, re-reading Parquet every epoch (one CPU left to Ray Data, see ser_platform/resources.py).

Each is also run "data only" (batches iterated and collated, no model) to show where the time goes.
Ratio = Ray epoch / in-process epoch; the goal is <= 1.25 with the demo model.

Part "scope": ``train_folds`` over 5 folds x 1 epoch with ``train.trainer_scope`` "trial" (one TorchTrainer)
and "fold" (one per fold): wall time of each, in one run.

    python benchmarks/ingest.py                        # ingest, demo model, 60 utterances/session (~5 min)
    python benchmarks/ingest.py --model tiny           # a model so small that ingest dominates
    python benchmarks/ingest.py --part scope           # trainer_scope trial vs fold (~5 min)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ser_platform.config import Config, from_dict, load_config  # noqa: E402
from ser_platform.tracking import git_commit  # noqa: E402

TINY_MODEL = {
    "model.embed_dim": 8, "model.num_heads": 2, "model.num_layers": 1, "model.embedding_dim": 8,
    "model.speech.tiny_hidden_size": 16, "model.speech.tiny_num_layers": 1, "model.speech.tiny_num_heads": 2,
    "model.speech.tiny_conv_dim": 8, "model.speech.cnn_channels": 4, "model.speech.lstm_hidden": 4,
    "model.text.tiny_hidden_size": 16, "model.text.tiny_num_layers": 1, "model.text.tiny_num_heads": 2,
}


def header() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"device: CPU, {os.cpu_count()} logical CPUs, load average {load} (shared machine: noisy)\n"
            f"torch {torch.__version__}, python {platform.python_version()}, git {git_commit()}")


def make_dataset(workdir: Path, utterances_per_session: int) -> str:
    from ser_platform.data.parquet import prepare_dataset
    from ser_platform.data.synthetic import write_synthetic_corpus

    corpus = write_synthetic_corpus(workdir / "corpus", utterances_per_session=utterances_per_session, seed=0)
    prepare_dataset(corpus, workdir / "parquet")
    return str(workdir / "parquet")


def bench_config(args: argparse.Namespace, dataset: str, workdir: Path) -> Config:
    overrides: dict[str, Any] = {"data.dataset": dataset, "train.epochs": args.epochs, "train.seed": 0,
                                 "tracking.mlflow_uri": f"sqlite:///{workdir / 'mlflow.db'}",
                                 "tracking.experiment": "bench-ingest"}
    if args.model == "tiny":
        overrides.update(TINY_MODEL)
    return load_config("demo", overrides=overrides)


def median_after_first(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


# --- the two sides of one epoch ---------------------------------------------------------------------------

def run_epochs(config: Config, batches_per_epoch, *, data_only: bool) -> list[float]:
    """Epoch wall times: iterate (and collate) each epoch's batches; unless ``data_only``, train on them."""
    from ser_platform.data.features import AcousticFeatures, FeatureParams
    from ser_platform.losses import JointLoss
    from ser_platform.models.ser_model import SERModel
    from ser_platform.train import seed_everything, train_epoch

    seed_everything(config.train.seed)
    model, loss_fn = SERModel(config.model), JointLoss(config.loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    features = AcousticFeatures(FeatureParams.from_speech_config(config.model.speech, config.data.sample_rate))
    times = []
    for epoch in range(1, config.train.epochs + 1):
        started = time.perf_counter()
        batches = batches_per_epoch(epoch)
        if data_only:
            rows = sum(len(batch["ids"]) for batch in batches)
            assert rows > 0
        else:
            train_epoch(model, loss_fn, optimizer, batches, config=config, features=features,
                        device=torch.device("cpu"))
        times.append(time.perf_counter() - started)
    return times


def in_process(config: Config, dataset: str, *, data_only: bool) -> list[float]:
    import pyarrow.parquet as pq

    from ser_platform.data.folds import fold_spec
    from ser_platform.data.loader import BASE_COLUMNS, LABEL_INDEX, make_collate, plan_batches
    from ser_platform.models.text import build_tokenizer
    from ser_platform.train import derive_seed

    spec = fold_spec(1, config.data.protocol)
    table = pq.read_table(dataset, columns=list(BASE_COLUMNS),
                          filters=[("speaker", "in", sorted(spec.train_speakers))])
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in BASE_COLUMNS}
    labels = np.asarray([LABEL_INDEX[str(v)] for v in rows["label"]])
    collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=config.data.max_text_tokens,
                           max_audio_samples=int(config.data.max_audio_seconds * config.data.sample_rate))

    class Plan(torch.utils.data.Sampler):
        def __init__(self, epoch: int):
            self.epoch = epoch

        def __iter__(self):
            rng = np.random.default_rng(derive_seed(config.train.seed, 1, self.epoch, 0))
            batches, leftover = plan_batches(labels, rows["duration"], config.train.batch_size,
                                             samples_per_class=config.train.samples_per_class,
                                             bucket_by_length=config.data.bucket_by_length, rng=rng)
            return iter([b.tolist() for b in batches] + ([leftover.tolist()] if len(leftover) else []))

    def loader(epoch: int):
        return torch.utils.data.DataLoader(range(len(labels)), batch_sampler=Plan(epoch), num_workers=0,
                                           collate_fn=lambda index: collate({k: v[index] for k, v in rows.items()}))

    return run_epochs(config, loader, data_only=data_only)


def _ray_worker(loop_config: dict) -> list[float]:
    import ray.train

    from ser_platform.data.loader import make_collate, train_batches
    from ser_platform.models.text import build_tokenizer
    from ser_platform.train import derive_seed

    torch.set_num_threads(1)
    config = from_dict(loop_config["config"])
    shard = ray.train.get_dataset_shard("train")
    collate = make_collate(build_tokenizer(config.model.text), max_text_tokens=config.data.max_text_tokens,
                           max_audio_samples=int(config.data.max_audio_seconds * config.data.sample_rate))

    def batches(epoch: int):
        return train_batches(shard, collate, batch_size=config.train.batch_size,
                             seed=derive_seed(config.train.seed, 1, epoch, 0),
                             samples_per_class=config.train.samples_per_class,
                             bucket_by_length=config.data.bucket_by_length)

    return run_epochs(config, batches, data_only=loop_config["data_only"])


def through_ray(config: Config, dataset: str, *, materialize: bool, data_only: bool) -> list[float]:
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from ser_platform.data.folds import fold_spec
    from ser_platform.data.loader import fold_datasets, read_dataset
    from ser_platform.resources import worker_cpus

    config = config.replace({"data.materialize": materialize})
    base = read_dataset(dataset, materialize=materialize)
    train = fold_datasets(base, fold_spec(1, config.data.protocol), materialize=materialize)["train"]
    cpus = worker_cpus(config, float(ray.cluster_resources()["CPU"]))
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"config": config.to_dict(), "data_only": data_only},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(name=f"ingest-{time.time_ns()}", storage_path=tempfile.mkdtemp(),
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets={"train": train},
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)))
    return trainer.fit().return_value


def part_ingest(args: argparse.Namespace, dataset: str, workdir: Path) -> str:
    config = bench_config(args, dataset, workdir)
    torch.set_num_threads(1)
    rows: list[tuple[str, list[float]]] = []
    for data_only in (False, True):
        suffix = " (data only)" if data_only else ""
        rows.append((f"in-process DataLoader{suffix}", in_process(config, dataset, data_only=data_only)))
        rows.append((f"Ray Data + Train, materialised{suffix}",
                     through_ray(config, dataset, materialize=True, data_only=data_only)))
        rows.append((f"Ray Data + Train, streaming{suffix}",
                     through_ray(config, dataset, materialize=False, data_only=data_only)))
    reference = {False: median_after_first(rows[0][1]), True: median_after_first(rows[3][1])}
    lines = [f"model: {args.model} ({config.train.batch_size} per batch, samples_per_class "
             f"{config.train.samples_per_class}), fold 1 training split, {args.epochs} epochs, 1 torch thread",
             "", "| run | epoch 1 s | later epochs s (median) | ratio to in-process |", "|---|---:|---:|---:|"]
    for name, times in rows:
        ref = reference["data only" in name]
        later = median_after_first(times)
        lines.append(f"| {name} | {times[0]:.2f} | {later:.2f} | {later / ref:.2f}x |")
    return "\n".join(lines)


def part_scope(args: argparse.Namespace, dataset: str, workdir: Path) -> str:
    from ser_platform.ray_train import train_folds

    config = bench_config(args, dataset, workdir).replace({"train.epochs": 1, "data.folds": (1, 2, 3, 4, 5)})
    lines = ["| trainer_scope | folds x epochs | wall s | test UA mean ± std |", "|---|---|---:|---|"]
    results = {}
    for scope in ("trial", "fold"):
        started = time.perf_counter()
        result = train_folds(config.replace({"train.trainer_scope": scope}), run_name=f"scope-{scope}-{time.time_ns()}",
                             storage_path=str(workdir / "storage"))
        wall = time.perf_counter() - started
        results[scope] = wall
        s = result.summary
        lines.append(f"| {scope} | 5 x 1 | {wall:.0f} | {s['test_ua_mean']:.3f} ± {s['test_ua_std']:.3f} |")
    lines.append("")
    lines.append(f"fold / trial = {results['fold'] / results['trial']:.2f}x; extra cost per fold with one trainer "
                 f"each: {(results['fold'] - results['trial']) / 4:.1f} s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ingest", "scope", "all"], default="ingest")
    parser.add_argument("--model", choices=["demo", "tiny"], default="demo")
    parser.add_argument("--utterances-per-session", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dataset", help="an existing Parquet dataset (default: write a synthetic one)")
    args = parser.parse_args()

    import ray

    from ser_platform.ray_train import quiet_ray

    with tempfile.TemporaryDirectory(prefix="ser-bench-ingest-") as tmp:
        workdir = Path(tmp)
        dataset = args.dataset or make_dataset(workdir, args.utterances_per_session)
        ray.init(address="local", num_cpus=os.cpu_count())
        quiet_ray()
        out = [header(), f"dataset: {dataset if args.dataset else f'synthetic, {args.utterances_per_session} per session'}"]
        if args.part in ("ingest", "all"):
            out += ["", part_ingest(args, dataset, workdir)]
        if args.part in ("scope", "all"):
            out += ["", part_scope(args, dataset, workdir)]
        ray.shutdown()
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
