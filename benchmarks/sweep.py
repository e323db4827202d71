"""Where a sweep's wall time goes: inside the optimizer steps vs everything around them, in one run.

Runs ``sweep.run_sweep`` in this process, as ``python experiments/sweep_loss_weights.py`` does (a fresh local Ray,
the demo preset, the embedded synthetic corpus: 60 kept utterances per session, seed 0), then reads the time
back from what the sweep logged to MLflow:

* run durations (``end_time - start_time``) of the sweep's trial runs and of their fold runs;
* per epoch, on each fold run: ``epoch_time_s`` (training pass + validation), ``train_time_s`` (training pass,
  batches included) and ``train_step_time_s`` (device copy, forward, loss, backward, clipping, optimizer step:
  ``train.train_epoch``).

The wall time (Ray start + sweep + Ray shutdown) splits into Ray start-up and shutdown, the sweep driver outside
its trials (before the first trial starts and after the last one ends: MLflow parent run, the fold splits, Tune
set-up, tables and Optuna plots) and the span of the trials. The trials' own time then splits, with nothing
left over, into nested layers summed over trials ("trial-seconds": with several trials at once they overlap, so
their sum exceeds the span by the concurrency): a trial outside its folds (the TorchTrainer's controller,
worker and placement group, MLflow trial run) / a fold outside its epochs (per-epoch MLflow logging and
checkpoints, the test evaluation, the confusion figure) / validation / waiting for training batches / the train
steps. Afterwards, with the sweep done, two parts of the "trial outside folds" layer are timed alone in the same
Ray instance: the fold-data preparation (``ray_train.prepare_fold_data``) and a TorchTrainer whose workers do
nothing (Ray Train's fixed cost); neither counts in the wall time.

``--before`` first runs the same sweep with the demo preset as it was before the embedded default was made
faster (``DEMO_BEFORE``: one trial at a time on both CPUs, 15 s audio crop, wider acoustic encoders and wav2vec2
convolutions, wav2vec2's feature encoder trained, dropout) and prints both breakdowns and their wall-time ratio,
measured in one run.

    python benchmarks/sweep.py                          # the embedded default itself (demo preset: 3 x 5 x 5)
    python benchmarks/sweep.py --before                 # the same, after the demo preset as it was (~15 min more)
    python benchmarks/sweep.py --trials 2 --epochs 2    # smaller
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
# The demo preset before it was made faster (issue 18; commit c61ed43's config._demo): one trial at a time on
# both CPUs, audio up to 15 s, the default 32-wide acoustic encoders and wav2vec2 convolutions, dropout.
DEMO_BEFORE = {"sweep.max_concurrent": 1, "data.max_audio_seconds": 15.0, "model.speech.tiny_conv_dim": 32,
               "model.speech.cnn_channels": 32, "model.speech.lstm_hidden": 32, "model.attn_dropout": 0.1,
               "model.relu_dropout": 0.1, "model.res_dropout": 0.1, "model.embed_dropout": 0.25,
               "model.dropout": 0.25, "model.speech.freeze_feature_encoder": False, "model.text.tiny_dropout": 0.1,
               "model.speech.tiny_dropout": 0.1}


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


def measure(overrides: dict, workdir: Path, dataset: str, args: argparse.Namespace, *, alone: bool) -> dict:
    """Run the sweep in a fresh local Ray; its wall time and layers read back from MLflow (module docstring).
    ``alone``: afterwards also time the fold data and an empty TorchTrainer in the same Ray instance."""
    import ray
    from mlflow import MlflowClient

    from ser_platform.data.folds import fold_spec
    from ser_platform.ray_train import init_ray, prepare_fold_data
    from ser_platform.resources import worker_cpus
    from ser_platform.sweep import run_sweep

    folds = tuple(int(f) for f in args.folds.split(","))
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = {**overrides, "data.dataset": dataset, "data.folds": folds, "train.epochs": args.epochs,
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
    figures = {"trials_at_once": min(config.sweep.max_concurrent, args.trials),
               "cpus": worker_cpus(config, float(ray.cluster_resources().get("CPU", 1)))}
    if alone:
        started = time.perf_counter()
        prepare_fold_data(dataset, {k: fold_spec(k, config.data.protocol) for k in folds},
                          materialize=config.data.materialize, progress=False)
        figures["fold_data_s"] = time.perf_counter() - started
        figures["noop_s"] = empty_trainer_seconds(config, workdir)
    t4 = time.perf_counter()
    ray.shutdown()
    t5 = time.perf_counter()
    if result.status != "FINISHED":
        raise SystemExit(f"sweep ended {result.status} ({result.errors} errored trial(s)): no figures")

    client = MlflowClient(result.mlflow_uri)
    exp = result.mlflow_experiment_id
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    span = (max(t.info.end_time for t in trials) - min(t.info.start_time for t in trials)) / 1000.0
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
    best = max(trials, key=lambda t: t.data.metrics.get(config.sweep.metric, -1.0))
    figures.update(
        wall=(t1 - t0) + (t2 - t1) + (t5 - t4), ray_start=t1 - t0, sweep_s=t2 - t1, ray_stop=t5 - t4, span=span,
        trials=len(trials), num_folds=num_folds, num_epochs=num_epochs, trial_s=trial_s,
        best_test_ua=(best.data.metrics.get("test_ua_mean"), best.data.metrics.get("test_ua_std")),
        outer=[("Ray start-up + shutdown", (t1 - t0) + (t5 - t4)),
               ("sweep driver outside trials (MLflow parent, fold splits, Tune, tables, plots)", t2 - t1 - span),
               ("trials, first start to last end", span)],
        layers=[("trial outside folds (TorchTrainer start-up, trial run)", trial_s - fold_s),
                ("fold outside epochs (epoch logging, checkpoints, test eval, figure)", fold_s - epoch_s),
                ("validation passes", epoch_s - train_s),
                ("waiting for training batches (Ray Data iterator, collate)", train_s - step_s),
                ("train steps (forward, backward, optimizer)", step_s)])
    return figures


def report(label: str, f: dict, config_line: str) -> None:
    print(f"{label}: {config_line}")
    print(f"sweep: {f['trials']} trials x {f['num_folds'] // max(f['trials'], 1)} folds ({f['num_folds']} fold runs, "
          f"{f['num_epochs']} epochs logged), {f['trials_at_once']} trial(s) at once, 1 Train worker x "
          f"{f['cpus']:g} CPU each")
    print(f"wall: {f['wall']:.1f} s (Ray start {f['ray_start']:.1f} s, run_sweep {f['sweep_s']:.1f} s, Ray shutdown "
          f"{f['ray_stop']:.1f} s); best trial's test UA {f['best_test_ua'][0]:.3f} ± {f['best_test_ua'][1]:.3f}")
    print()
    print(f"{'wall-clock layer':<80} {'seconds':>8} {'share':>7}")
    for name, value in f["outer"]:
        print(f"{name:<80} {value:>8.1f} {value / f['wall']:>7.1%}")
    print()
    print(f"{'inside the trials, summed over trials (trial-seconds)':<80} {'seconds':>8} {'share':>7}")
    for name, value in f["layers"]:
        print(f"{name:<80} {value:>8.1f} {value / f['trial_s']:>7.1%}")
    print(f"{'sum':<80} {f['trial_s']:>8.1f}")
    print(f"concurrency: {f['trial_s'] / max(f['span'], 1e-9):.2f} trials on average over the trials' span")
    per_epoch = f["layers"][-1][1] / max(f["num_epochs"], 1)
    print(f"per epoch: {per_epoch:.2f} s in steps + "
          f"{sum(v for _, v in f['layers'][2:4]) / max(f['num_epochs'], 1):.2f} s around them (trial-seconds)")
    name, value = max(f["layers"], key=lambda item: item[1])
    print(f"largest layer inside the trials: {name} ({value / f['trial_s']:.1%} of trial-seconds)")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=EMBEDDED_DEFAULT["trials"],
                        help=f"Optuna trials (default: the embedded default's {EMBEDDED_DEFAULT['trials']})")
    parser.add_argument("--epochs", type=int, default=EMBEDDED_DEFAULT["epochs"],
                        help=f"epochs per fold (default: the embedded default's {EMBEDDED_DEFAULT['epochs']})")
    parser.add_argument("--folds", default="1,2,3,4,5", help="folds (embedded default: all five)")
    parser.add_argument("--gpu", action="store_true", help="train on one GPU per worker")
    parser.add_argument("--before", action="store_true",
                        help="first run the demo preset as it was before it was made faster (DEMO_BEFORE)")
    parser.add_argument("--workdir", help="where the corpus, MLflow store and Tune storage go (default: a temp dir)")
    args = parser.parse_args()

    import ray

    from ser_platform.demo import ensure_demo_dataset

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ser-bench-sweep-")).resolve()
    started = time.perf_counter()
    dataset = ensure_demo_dataset(workdir / "demo", progress=False)  # what the embedded default builds once
    dataset_s = time.perf_counter() - started
    before = measure(DEMO_BEFORE, workdir / "before", dataset, args, alone=False) if args.before else None
    after = measure({}, workdir / "after", dataset, args, alone=True)

    print(device_line())
    print(f"torch {torch.__version__}, ray {ray.__version__}, python {platform.python_version()}, git {git_commit()}")
    print(f"embedded synthetic corpus (60 utterances/session, 300 in all), Optuna search; one-off before the "
          f"sweeps (cached afterwards): synthetic corpus + Parquet {dataset_s:.1f} s")
    print()
    if before:
        report("before", before, "demo preset with " + ", ".join(f"{k}={v}" for k, v in DEMO_BEFORE.items()))
    report("now" if before else "demo preset", after, "the demo preset as it is")
    per_trial = after["layers"][0][1] / after["trials"]
    print(f"one trial's fold data alone (read + split + leakage check + materialise; a sweep's driver does it once "
          f"for all its trials): {after['fold_data_s']:.1f} s")
    print(f"an empty TorchTrainer (same workers and resources, workers do nothing): {after['noop_s']:.1f} s = "
          f"{after['noop_s'] / max(per_trial, 1e-9):.0%} of a trial's 'outside folds' layer ({per_trial:.1f} s)")
    if before:
        print(f"wall time now / before: {after['wall'] / before['wall']:.3f}x "
              f"({after['wall']:.0f} s vs {before['wall']:.0f} s, measured in this run)")
    print(f"(corpus, MLflow stores and Tune storage in {workdir})")


if __name__ == "__main__":
    main()
