"""Where a sweep's wall time goes: inside the optimizer steps vs everything around them, in one run.

Runs ``sweep.run_sweep`` in this process, as ``python experiments/sweep_loss_weights.py`` does (a fresh local Ray,
the demo preset, the embedded synthetic corpus: 60 kept utterances per session, seed 0), then reads the time
back from what the sweep logged to MLflow:

* run durations (``end_time - start_time``) of the sweep's trial runs and of their fold runs;
* per epoch, on each fold run: ``epoch_time_s`` (training pass + validation), ``train_time_s`` (training pass,
  batches included) and ``train_step_time_s`` (device copy, forward, loss, backward, clipping, optimizer step:
  ``train.train_epoch``).

The wall time (Ray start + sweep + Ray shutdown) then splits, with nothing left over, into nested layers:
Ray start-up and shutdown / the sweep driver outside its trials (MLflow parent run, Tune set-up and
scheduling, tables and Optuna plots) / a trial outside its folds (fold data read, leakage check and
materialisation, the TorchTrainer's controller, worker and placement group, MLflow trial run) / a fold
outside its epochs (per-epoch MLflow logging and checkpoints, the test evaluation, the confusion figure) /
validation / waiting for training batches / the train steps. Trials run one at a time (sweep.max_concurrent 1,
as the embedded default on 2 CPUs), so the sums add up to the wall time. Afterwards, with the sweep done, two
parts of the "trial outside folds" layer are timed alone in the same Ray instance: one trial's fold-data
preparation (``ray_train.prepare_fold_data``) and a TorchTrainer whose workers do nothing (Ray Train's fixed
cost); neither counts in the wall time.

    python benchmarks/sweep.py                          # the embedded default itself (demo preset: 3 x 5 x 5, ~8 min)
    python benchmarks/sweep.py --trials 2 --epochs 2    # smaller (~3 min on 2 cores)

The last lines extrapolate the measured layers to the embedded default (the demo preset's trials, 5 folds, its
epochs): fixed costs per sweep, per trial, per fold and per epoch, each taken from this run.
"""

from __future__ import annotations

import argparse
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

from prepare import cpu_name  # noqa: E402  (benchmarks/ is on sys.path: scripts run as python benchmarks/x.py)

_DEMO = load_config("demo")
EMBEDDED_DEFAULT = {"trials": _DEMO.sweep.trials, "folds": len(_DEMO.data.folds), "epochs": _DEMO.train.epochs}


def device_line() -> str:
    if torch.cuda.is_available():
        return f"device: GPU {torch.cuda.get_device_name(0)} (the sweep trains on CPU unless --gpu)"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"device: CPU ({cpu_name()}), {os.cpu_count()} logical CPUs, load average {load} (shared machine: noisy)"


def seconds(run) -> float:
    return ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000.0


def metric_sum(client, run_id: str, key: str) -> float:
    return sum(m.value for m in client.get_metric_history(run_id, key))


def empty_trainer_seconds(config, workdir: Path) -> float:
    """A TorchTrainer whose workers do nothing, same workers and resources as a trial's: Ray Train's fixed cost."""
    import ray.train
    from ray.train.torch import TorchTrainer

    import ray

    from ser_platform.resources import worker_cpus

    cpus = worker_cpus(config, float(ray.cluster_resources().get("CPU", 1)))  # "auto" resolved as a trial does
    resources = {"CPU": cpus, **({"GPU": config.train.gpus_per_worker} if config.train.use_gpu else {})}
    trainer = TorchTrainer(lambda _: None, scaling_config=ray.train.ScalingConfig(
        num_workers=config.train.num_workers, use_gpu=config.train.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(name="empty", storage_path=str(workdir / "empty_trainer")))
    started = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=EMBEDDED_DEFAULT["trials"],
                        help=f"Optuna trials (default: the embedded default's {EMBEDDED_DEFAULT['trials']})")
    parser.add_argument("--epochs", type=int, default=EMBEDDED_DEFAULT["epochs"],
                        help=f"epochs per fold (default: the embedded default's {EMBEDDED_DEFAULT['epochs']})")
    parser.add_argument("--folds", default="1,2,3,4,5", help="folds (embedded default: all five)")
    parser.add_argument("--gpu", action="store_true", help="train on one GPU per worker")
    parser.add_argument("--workdir", help="where the corpus, MLflow store and Tune storage go (default: a temp dir)")
    args = parser.parse_args()

    import ray
    from mlflow import MlflowClient

    from ser_platform.demo import ensure_demo_dataset
    from ser_platform.ray_train import init_ray, prepare_fold_data
    from ser_platform.sweep import run_sweep

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ser-bench-sweep-")).resolve()
    started = time.perf_counter()
    dataset = ensure_demo_dataset(workdir / "demo", progress=False)  # what the embedded default builds once
    dataset_s = time.perf_counter() - started
    folds = tuple(int(f) for f in args.folds.split(","))
    overrides = {"data.dataset": dataset, "data.folds": folds, "train.epochs": args.epochs,
                 "sweep.trials": args.trials, "tracking.mlflow_uri": f"sqlite:///{workdir / 'mlflow.db'}",
                 "tracking.storage": str(workdir / "runs"), "tracking.experiment": "bench-sweep"}
    if args.gpu:
        overrides["train.use_gpu"] = True
    config = load_config("demo", overrides=overrides)

    t0 = time.perf_counter()
    init_ray()  # as the script does: a fresh local instance with every CPU of the machine
    t1 = time.perf_counter()
    result = run_sweep(config, name="bench", verbose=False)
    t2 = time.perf_counter()
    # With the sweep done: one trial's fold data alone (read, split, leakage check, materialise), same Ray.
    from ser_platform.data.folds import fold_spec

    specs = {k: fold_spec(k, config.data.protocol) for k in folds}
    t3 = time.perf_counter()
    prepare_fold_data(dataset, specs, materialize=config.data.materialize, progress=False)
    fold_data_s = time.perf_counter() - t3
    noop_s = empty_trainer_seconds(config, workdir)
    from ser_platform.resources import worker_cpus

    cpus_per_worker = worker_cpus(config, float(ray.cluster_resources().get("CPU", 1)))
    t4 = time.perf_counter()
    ray.shutdown()
    t5 = time.perf_counter()
    if result.status != "FINISHED":
        raise SystemExit(f"sweep ended {result.status} ({result.errors} errored trial(s)): no figures")

    client = MlflowClient(result.mlflow_uri)
    exp = result.mlflow_experiment_id
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    trial_s = sum(seconds(t) for t in trials)
    fold_s = epoch_s = train_s = step_s = 0.0
    num_folds = num_epochs = 0
    for trial in trials:
        for fold in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'"):
            fold_s += seconds(fold)
            num_folds += 1
            num_epochs += len(client.get_metric_history(fold.info.run_id, "epoch_time_s"))
            epoch_s += metric_sum(client, fold.info.run_id, "epoch_time_s")
            train_s += metric_sum(client, fold.info.run_id, "train_time_s")
            step_s += metric_sum(client, fold.info.run_id, "train_step_time_s")
    ray_s = (t1 - t0) + (t5 - t4)
    sweep_s = t2 - t1
    wall = ray_s + sweep_s
    layers = [
        ("Ray start-up + shutdown", ray_s),
        ("sweep driver outside trials (MLflow parent, Tune, tables, plots)", sweep_s - trial_s),
        ("trial outside folds (fold data, TorchTrainer start-up, trial run)", trial_s - fold_s),
        ("fold outside epochs (epoch logging, checkpoints, test eval, figure)", fold_s - epoch_s),
        ("validation passes", epoch_s - train_s),
        ("waiting for training batches (Ray Data iterator, collate)", train_s - step_s),
        ("train steps (forward, backward, optimizer)", step_s),
    ]

    print(device_line())
    print(f"torch {torch.__version__}, ray {ray.__version__}, python {platform.python_version()}, git {git_commit()}")
    print(f"sweep: demo preset, embedded synthetic corpus (60 utterances/session, 300 in all), Optuna search, "
          f"{len(trials)} trials x {len(folds)} folds x {args.epochs} epochs ({num_folds} fold runs, "
          f"{num_epochs} epochs logged), 1 trial at a time, {config.train.num_workers} Train worker(s) x "
          f"{cpus_per_worker:g} CPU")
    print(f"one-off, before the sweep (cached afterwards): synthetic corpus + Parquet {dataset_s:.1f} s")
    print(f"wall: {wall:.1f} s (Ray start {t1 - t0:.1f} s, run_sweep {sweep_s:.1f} s, Ray shutdown {t5 - t4:.1f} s)")
    print()
    print(f"{'layer':<72} {'seconds':>8} {'share':>7}")
    for name, value in layers:
        print(f"{name:<72} {value:>8.1f} {value / wall:>7.1%}")
    print(f"{'sum':<72} {sum(v for _, v in layers):>8.1f} {sum(v for _, v in layers) / wall:>7.1%}")
    print()
    outside = wall - step_s
    print(f"inside train steps: {step_s / wall:.1%} of wall; outside: {outside / wall:.1%} "
          f"(outside / inside = {outside / max(step_s, 1e-9):.1f}x)")
    print(f"one trial's fold data alone (read + split + leakage check + materialise, {len(folds)} folds): "
          f"{fold_data_s:.1f} s = {fold_data_s / max((trial_s - fold_s) / len(trials), 1e-9):.0%} of a trial's "
          f"'outside folds' layer ({(trial_s - fold_s) / len(trials):.1f} s per trial)")
    print(f"an empty TorchTrainer (same workers and resources, workers do nothing): {noop_s:.1f} s = "
          f"{noop_s / max((trial_s - fold_s) / len(trials), 1e-9):.0%} of that layer")
    name, value = max(layers, key=lambda item: item[1])
    print(f"dominant layer: {name} ({value / wall:.1%} of wall)")

    # Extrapolation to the embedded default from this run's per-unit costs (not measured at that size).
    per_sweep = ray_s + (sweep_s - trial_s)
    per_trial = (trial_s - fold_s) / len(trials)
    per_fold = (fold_s - epoch_s) / num_folds
    per_epoch_step = step_s / num_epochs
    per_epoch_other = (epoch_s - step_s) / num_epochs
    d = EMBEDDED_DEFAULT
    n_trials, n_folds, n_epochs = d["trials"], d["trials"] * d["folds"], d["trials"] * d["folds"] * d["epochs"]
    est_steps = n_epochs * per_epoch_step
    est_wall = per_sweep + n_trials * per_trial + n_folds * per_fold + n_epochs * (per_epoch_step + per_epoch_other)
    print(f"per unit: sweep {per_sweep:.1f} s, trial {per_trial:.1f} s, fold {per_fold:.2f} s, epoch "
          f"{per_epoch_step:.2f} s in steps + {per_epoch_other:.2f} s around them")
    print(f"extrapolated to the embedded default ({d['trials']} trials x {d['folds']} folds x {d['epochs']} epochs): "
          f"wall ~{est_wall:.0f} s, train steps {est_steps / est_wall:.0%} of it")
    print(f"(corpus, MLflow store and Tune storage in {workdir})")


if __name__ == "__main__":
    main()
