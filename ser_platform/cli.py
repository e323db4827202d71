"""`ser` — the command line. The only module that parses arguments; each command calls one library function.

    ser synth OUT                      write a synthetic corpus in IEMOCAP's layout
    ser prepare --source DIR --out DS  IEMOCAP (real or synthetic) -> one Parquet dataset
    ser model-summary --preset P       parameters per part of the model
    ser cache --dataset DS ...         frozen encoders' hidden states, computed once, stored beside DS
    ser train --dataset DS ...         train one configuration on leave-one-session-out folds (Ray Train)
    ser sweep --dataset DS ...         Ray Tune + Optuna over the loss weights, margin and metric-loss space
    ser tables --experiment NAME       the paper's tables from logged MLflow runs
    ser predict --run RUN_ID ...       class probabilities of new utterances from a fold run's selected model
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from ser_platform.config import Config, ConfigError, load_config, parse_override


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", choices=["demo", "paper"],
                        help="starting configuration (default: demo — tiny encoders, CPU, minutes)")
    parser.add_argument("--config", metavar="YAML", help="YAML file overriding the preset (data only)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="dotted override, repeatable, e.g. --set loss.alpha=0.5 --set model.focus_attention=false")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment name")
    parser.add_argument("--storage", help="Ray run storage: a local folder, s3://... or gs://... (default: ./runs)")


def build_config(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    """Preset -> YAML -> --set overrides -> the command's own flags (most specific wins)."""
    overrides: dict[str, Any] = dict(parse_override(text) for text in args.overrides)
    for flag, key in (("mlflow_uri", "tracking.mlflow_uri"), ("experiment", "tracking.experiment"),
                      ("storage", "tracking.storage")):
        if getattr(args, flag, None):
            overrides[key] = getattr(args, flag)
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load_config(args.preset, args.config, overrides)


# --- commands ----------------------------------------------------------------------------------------------

def _cmd_synth(args: argparse.Namespace) -> int:
    from ser_platform.data.synthetic import write_synthetic_corpus

    root = write_synthetic_corpus(args.out, utterances_per_session=args.utterances_per_session, seed=args.seed,
                                  overwrite=args.overwrite, progress=True)
    print(f"synthetic corpus written to {root}")
    print(f"next: ser prepare --source {root} --out {root}.parquet")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from ser_platform.data.parquet import format_summary, prepare_dataset

    summary = prepare_dataset(args.source, args.out, features=args.features, overwrite=args.overwrite,
                              skip_bad=args.skip_bad, progress=not args.json)
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json else format_summary(summary))
    return 0


def _cmd_model_summary(args: argparse.Namespace) -> int:
    config = build_config(args)  # a bad option fails before the heavy imports
    from ser_platform.models.ser_model import model_summary

    print(model_summary(config.model))
    return 0


def _parse_layers(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        layers = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--layers={text!r}: expected comma-separated integers, e.g. -1 or -1,6,12") from None
    if not layers or any(layer < -1 for layer in layers):
        raise ConfigError(f"--layers={text!r}: expected -1 (the encoder's output) or hidden-state indices >= 0")
    return layers


def _cmd_cache(args: argparse.Namespace) -> int:
    layers = _parse_layers(args.layers)
    config = build_config(args, {"model.text.name": args.text_encoder, "model.speech.name": args.speech_encoder,
                                 "model.encoders": "frozen", "data.encoder_cache": ""})
    from ser_platform.frozen_encoders import cache_command

    return cache_command(config, args.dataset, root=args.out, batch_size=args.batch_size, device=args.device,
                         force=args.force, layers={"text": layers, "speech": layers} if layers else None)


def _cmd_train(args: argparse.Namespace) -> int:
    config = build_config(args, {
        "data.dataset": args.dataset,
        "data.folds": args.folds,
        "train.num_workers": args.workers,
        "train.use_gpu": True if args.gpu else None,
        "train.epochs": args.epochs,
        "train.seed": args.seed,
        "train.seeds": args.seeds,
    })
    from ser_platform.ray_train import train_command

    return train_command(config, ray_address=args.ray_address)


def _cmd_sweep(args: argparse.Namespace) -> int:
    config = build_config(args, {
        "data.dataset": args.dataset,
        "sweep.trials": args.trials,
        "sweep.max_concurrent": args.max_concurrent,
        "sweep.seed": args.seed,
        "sweep.grid": args.grid,
    })
    from ser_platform.sweep import sweep_command

    return sweep_command(config, name=args.name, resume=args.resume, ray_address=args.ray_address)


def _cmd_tables(args: argparse.Namespace) -> int:
    from ser_platform.tables import tables_command

    return tables_command(experiment=args.experiment, mlflow_uri=args.mlflow_uri, compare=args.compare)


def _cmd_predict(args: argparse.Namespace) -> int:
    from ser_platform.predict import predict_command

    return predict_command(args.run, wav=args.wav, text=args.text, csv_path=args.csv, fold=args.fold,
                           mlflow_uri=args.mlflow_uri, as_json=args.json)


# --- parser ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ser", description="Multimodal speech emotion recognition experiments on Ray (IEMOCAP, focus attention, "
                                "joint triplet + cross-entropy loss).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic corpus in IEMOCAP's exact layout")
    p.add_argument("out", help="folder to create (it will hold Session1..Session5)")
    p.add_argument("--utterances-per-session", type=int, default=60, help="kept utterances per session (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus at OUT")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="parse IEMOCAP (real or synthetic) into one Parquet dataset")
    p.add_argument("--source", required=True, help="IEMOCAP_full_release folder (holds Session1..Session5)")
    p.add_argument("--out", required=True, help="Parquet dataset folder to write")
    p.add_argument("--features", action="store_true", help="also store 40-d MFCC and the spectrogram (§3.2)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad inputs instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("model-summary", help="print the model's parameters per part")
    _add_config_args(p)
    p.set_defaults(func=_cmd_model_summary)

    p = sub.add_parser("cache", help="compute the frozen encoders' hidden states once and store them beside the "
                                     "dataset (DATASET.cache), for model.encoders=frozen + data.encoder_cache=auto")
    _add_config_args(p)
    p.add_argument("--dataset", required=True, help="Parquet dataset from `ser prepare` (a local folder)")
    p.add_argument("--text-encoder", help="text encoder name or path (default: the config's model.text.name)")
    p.add_argument("--speech-encoder", help="speech encoder name or path (default: the config's model.speech.name)")
    p.add_argument("--layers", help="comma-separated layers to store for both encoders: -1 = the encoder's output, "
                                    "L = hidden_states[L], 0 = embeddings; write --layers=-1,6 when the list starts "
                                    "with -1 (default: the config's model.text.layer / model.speech.layer)")
    p.add_argument("--batch-size", type=int, default=16, help="utterances per encoder batch (default 16)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is a GPU, else cpu")
    p.add_argument("--out", help="cache folder (default: DATASET.cache beside the dataset)")
    p.add_argument("--force", action="store_true", help="recompute entries that are already up to date")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("train", help="train one configuration on leave-one-session-out folds (Ray Train DDP)")
    _add_config_args(p)
    p.add_argument("--dataset", help="Parquet dataset from `ser prepare` (local, s3:// or gs://)")
    p.add_argument("--folds", help="comma-separated folds, e.g. 1,2,3,4,5 (default: all of the protocol)")
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", type=int, help="run every fold with N seeds (seed, seed+1, ...); mean ± std over "
                                             "folds × seeds (default 1)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sweep", help="Ray Tune + Optuna sweep; every trial runs all folds")
    _add_config_args(p)
    p.add_argument("--dataset", help="Parquet dataset (default: the embedded synthetic corpus)")
    p.add_argument("--trials", type=int)
    p.add_argument("--max-concurrent", type=int)
    p.add_argument("--seed", type=int, help="Optuna sampler seed")
    p.add_argument("--grid", choices=["paper"], help="run exactly Table 2's (alpha, beta) points")
    p.add_argument("--name", help="sweep name (Tune experiment and MLflow parent run)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same --name")
    p.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("tables", help="print the paper's tables from logged MLflow runs")
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="paired comparison (A − B, test UA and WA over the same folds and seeds) of two trial "
                        "runs, each a run id, run name or variant name")
    p.set_defaults(func=_cmd_tables)

    p = sub.add_parser("predict", help="class probabilities of new utterances from a finished fold run's model")
    p.add_argument("--run", required=True, metavar="RUN_ID",
                   help="MLflow run: a fold run, or a train/trial run (then --fold picks one; default the first), "
                        "or a sweep (its best trial)")
    p.add_argument("--fold", type=int, help="which fold's model when --run is a train, trial or sweep run")
    p.add_argument("--wav", help="a wav file (any rate, mono or multi-channel: mixed to mono, resampled to 16 kHz)")
    p.add_argument("--text", help="its transcript (with --wav)")
    p.add_argument("--csv", help="CSV with columns wav,text (relative wav paths: relative to the CSV's folder)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"ser {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # DataError and friends: messages already name the file/row
        if type(err).__module__.startswith("ser_platform"):
            print(f"ser {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
