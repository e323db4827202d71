"""Flags shared by the experiment scripts (sweep_loss_weights.py, ablation.py, embedding_space.py,
compare_models.py).

The same names as ``ser sweep`` (``--preset``, ``--config``, ``--set``, ``--dataset``, ``--mlflow-uri``, ...) plus
the resources of one trial. Configs are built the way ``ser`` builds them: preset -> YAML -> the experiment's own
defaults (with the demo preset also its demo defaults) -> ``--set`` -> these flags (most specific wins).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from ser_platform.config import Config, ConfigError

# Experiment scripts are run as `python experiments/<name>.py`, so this folder is on sys.path and they import this
# module by its bare name.


def build_parser(description: str, *, grid: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    config = parser.add_argument_group("configuration")
    config.add_argument("--preset", default="demo", choices=["demo", "paper"],
                        help="starting configuration (default: demo — tiny encoders, CPU, minutes)")
    config.add_argument("--config", metavar="YAML", help="YAML file overriding the preset (data only)")
    config.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="dotted override, repeatable: --set train.epochs=3 --set model.focus_attention=false")
    config.add_argument("--dataset", "--data", dest="dataset",
                        help="Parquet dataset from `ser prepare` (local, s3://, gs://); default: the embedded "
                             "synthetic corpus, written to ./data/demo/ on first use")
    config.add_argument("--epochs", type=int, help="training epochs per fold")
    config.add_argument("--folds", help="comma-separated folds (default: all five sessions of loso5)")
    config.add_argument("--seed", type=int, help="training seed, and the Optuna sampler's seed")
    config.add_argument("--seeds", type=int, help="run every fold of a trial with N training seeds (seed, seed+1, "
                                                  "...); tables show mean ± std over folds × seeds (default 1)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--trials", type=int, help="Optuna trials (configurations), each over every fold")
    sweep.add_argument("--max-concurrent", type=int, help="trials at once (capped by what the cluster fits)")
    if grid:
        sweep.add_argument("--grid", choices=["paper"],
                           help="instead of Optuna, exactly Table 2's (alpha, beta) points")
    sweep.add_argument("--name", help="sweep name: Tune experiment folder and MLflow parent run (default: dated)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue an interrupted sweep (--name, else the latest in --storage)")
    resources = parser.add_argument_group("resources per trial")
    resources.add_argument("--workers-per-trial", type=int, help="Ray Train workers (DDP ranks) per trial")
    resources.add_argument("--cpus-per-worker", type=float, help="CPUs per Ray Train worker")
    resources.add_argument("--gpus-per-trial", type=float,
                           help="GPUs per trial, shared by its workers (implies training on GPU)")
    resources.add_argument("--gpu", action="store_true", help="one GPU per worker")
    where = parser.add_argument_group("where things go")
    where.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                            "sqlite:///mlflow.db in the working directory)")
    where.add_argument("--experiment", help="MLflow experiment name (default: ser_platform)")
    where.add_argument("--storage", help="Ray Tune storage: local folder, s3://... or gs://... (default: ./runs)")
    where.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")
    return parser


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted config keys the flags set (None: flag not given)."""
    overrides: dict[str, Any] = {
        "data.dataset": args.dataset,
        "data.folds": args.folds,
        "train.epochs": args.epochs,
        "train.seed": args.seed,
        "train.seeds": args.seeds,
        "sweep.seed": args.seed,
        "sweep.trials": args.trials,
        "sweep.max_concurrent": args.max_concurrent,
        "sweep.grid": getattr(args, "grid", None),
        "train.num_workers": args.workers_per_trial,
        "train.cpus_per_worker": args.cpus_per_worker,
        "tracking.mlflow_uri": args.mlflow_uri,
        "tracking.experiment": args.experiment,
        "tracking.storage": args.storage,
    }
    if args.gpu:
        overrides["train.use_gpu"] = True
    if args.gpus_per_trial is not None:
        if args.gpus_per_trial <= 0:
            raise ConfigError(f"--gpus-per-trial={args.gpus_per_trial!r}: expected > 0")
        overrides["train.use_gpu"] = True
    return {k: v for k, v in overrides.items() if v is not None}


def build_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Config:
    from ser_platform.config import load_config, parse_override

    overrides = dict(defaults or {})
    overrides.update(dict(parse_override(text) for text in args.overrides))
    overrides.update(flag_overrides(args))
    config = load_config(args.preset, args.config, overrides)
    if args.gpus_per_trial is not None:  # the trial's GPUs are shared by however many workers it ends up with
        config = config.replace({"train.gpus_per_worker": args.gpus_per_trial / config.train.num_workers})
    return config


def experiment_config(args: argparse.Namespace, experiment: Any | None) -> Config:
    """The config an experiment script runs: its defaults (and, with the demo preset, its demo defaults) under
    the user's ``--set`` and flags."""
    defaults: dict[str, Any] = {}
    if experiment is not None:
        defaults = {**(experiment.demo_defaults if args.preset == "demo" else {}), **experiment.defaults}
    return build_config(args, defaults)


def run(experiment_key: str | None, description: str, argv: Sequence[str] | None = None) -> int:
    """Parse flags, build the config, run the experiment's sweep; errors in the input exit 2 with one line."""
    parser = build_parser(description, grid=experiment_key is None)
    args = parser.parse_args(argv)
    try:
        from ser_platform.sweep import EXPERIMENTS, experiment_command, sweep_command

        experiment = EXPERIMENTS[experiment_key] if experiment_key else None
        config = experiment_config(args, experiment)
        if experiment is None:
            return sweep_command(config, name=args.name, resume=args.resume, ray_address=args.ray_address)
        return experiment_command(config, experiment, name=args.name, resume=args.resume,
                                  ray_address=args.ray_address)
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # DataError, TrackingError, TablesError: their messages name the file or URI
        if type(err).__module__.startswith("ser_platform"):
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        raise
