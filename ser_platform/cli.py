"""`ser` and the experiment scripts: the one command line. The only module that parses arguments; each command
calls one library function.

    ser synth OUT                      write a synthetic corpus in IEMOCAP's layout
    ser prepare --source DIR --out DS  IEMOCAP (real or synthetic) -> one Parquet dataset
    ser model-summary --preset P       parameters per part of the model
    ser cache --dataset DS ...         frozen encoders' hidden states, computed once, stored beside DS
    ser train --dataset DS ...         train one configuration on leave-one-session-out folds (Ray Train)
    ser sweep --experiment KEY ...     Ray Tune over a catalogue experiment (Tables 1-4, the grid, the search)
    ser transcribe --dataset DS ...    speech recognition (Whisper) into an ASR text track of DS, with its WER
    ser tables                         the paper's tables from logged MLflow runs
    ser predict --run RUN_ID ...       class probabilities of new utterances from a fold run's selected model

``experiments/*.py`` call :func:`experiment_main`: the parser of ``ser sweep`` with the experiment fixed, so every
flag means the same in both. Every expected failure (a bad value, a missing or corrupt file, an unreachable
server) ends in one line naming the file, option or server, exit code 2; ``--debug`` or ``SER_DEBUG=1`` shows the
traceback instead; Ctrl-C exits 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Sequence

from ser_platform.config import Config, ConfigError, load_config, parse_override

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# --- flag groups, each defined once --------------------------------------------------------------------------

def _add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", default="demo", choices=["demo", "paper"],
                       help="starting configuration (default: demo — tiny encoders, CPU, minutes)")
    group.add_argument("--config", metavar="YAML", help="YAML file overriding the preset (data only)")
    group.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                       help="dotted override, repeatable: --set loss.alpha=0.5 --set model.focus_attention=false")
    where = parser.add_argument_group("where things go")
    where.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                            "sqlite:///mlflow.db in the working directory)")
    where.add_argument("--mlflow-experiment", help="MLflow experiment name (default: ser_platform)")
    where.add_argument("--storage", help="Ray run storage: a local folder, s3://... or gs://... (default: ./runs)")
    where.add_argument("--shared-filesystem", action="store_true",
                       help="every node of the cluster mounts the local paths given (dataset, storage, MLflow "
                            "store); without it they are refused on a cluster of several nodes")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """What ``ser train`` and every sweep share: the data, the folds and seeds, the resources, the cluster."""
    group = parser.add_argument_group("data and training")
    group.add_argument("--dataset", "--data", dest="dataset",
                       help="Parquet dataset from `ser prepare` (local, s3://, gs://); default: the embedded "
                            "synthetic corpus, written to ./data/demo/ on first use")
    group.add_argument("--folds", help="comma-separated folds (default: all five sessions of loso5)")
    group.add_argument("--epochs", type=int, help="training epochs per fold")
    group.add_argument("--seed", type=int, help="training seed, and the Optuna sampler's seed")
    group.add_argument("--seeds", type=int, help="run every fold with N training seeds (seed, seed+1, ...); "
                                                 "tables show mean ± std over folds × seeds (default 1)")
    resources = parser.add_argument_group("resources per configuration (a sweep's trial)")
    resources.add_argument("--workers", "--workers-per-trial", dest="workers", type=int,
                           help="Ray Train workers (DDP ranks)")
    resources.add_argument("--cpus-per-worker", type=float, help="CPUs per Ray Train worker (0 = auto)")
    resources.add_argument("--gpus-per-trial", type=float,
                           help="GPUs per configuration, shared by its workers (implies training on GPU)")
    resources.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    resources.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and Tune's own output (by default it goes to Ray's log folder, which "
                             "the run names; the project's lines per epoch, fold and trial always show)")


def _add_sweep_args(parser: argparse.ArgumentParser, *, choose_experiment: bool, grid: bool) -> None:
    from ser_platform.catalogue import EXPERIMENTS, GROUPS

    group = parser.add_argument_group("sweep")
    if choose_experiment:
        group.add_argument("--experiment", choices=sorted(EXPERIMENTS) + sorted(GROUPS),
                           help="catalogue experiment: search (Optuna, Table 2), grid (Table 2's points), ablation "
                                "(Table 1), embedding_space (Table 3), compare_models (Table 4), or tables (Tables "
                                "1-3 in turn, one sweep each); default: search, or grid with --grid paper")
    if grid:
        group.add_argument("--grid", choices=["paper"], help="exactly Table 2's (alpha, beta) points instead of "
                                                             "the Optuna search (with the default experiment)")
    group.add_argument("--trials", type=int, help="Optuna trials (configurations), each over every fold")
    group.add_argument("--max-concurrent", type=int, help="trials at once (capped by what the cluster fits)")
    group.add_argument("--name", help="sweep name: Tune experiment folder and MLflow parent run (default: dated)")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted sweep (--name, else the latest in --storage)")


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also SER_DEBUG=1)")


# --- configs ------------------------------------------------------------------------------------------------

def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted config keys the flags set (a flag not given sets nothing)."""
    flags = {
        "mlflow_uri": "tracking.mlflow_uri", "mlflow_experiment": "tracking.experiment", "storage": "tracking.storage",
        "dataset": "data.dataset", "folds": "data.folds", "epochs": "train.epochs", "seeds": "train.seeds",
        "workers": "train.num_workers", "cpus_per_worker": "train.cpus_per_worker", "trials": "sweep.trials",
        "max_concurrent": "sweep.max_concurrent", "grid": "sweep.grid",
    }
    overrides = {key: getattr(args, flag) for flag, key in flags.items() if getattr(args, flag, None) is not None}
    if getattr(args, "seed", None) is not None:  # one seed for training and for the Optuna sampler
        overrides.update({"train.seed": args.seed, "sweep.seed": args.seed})
    if getattr(args, "gpu", False):
        overrides["train.use_gpu"] = True
    if getattr(args, "shared_filesystem", False):
        overrides["tracking.shared_filesystem"] = True
    gpus = getattr(args, "gpus_per_trial", None)
    if gpus is not None:
        if gpus <= 0:
            raise ConfigError(f"--gpus-per-trial={gpus!r}: expected > 0")
        overrides["train.use_gpu"] = True
    return overrides


def build_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> Config:
    """Preset -> YAML -> ``defaults`` (an experiment's) -> ``--set`` -> the flags -> ``extra`` (most specific
    wins)."""
    overrides = dict(defaults or {})
    overrides.update(dict(parse_override(text) for text in args.overrides))
    overrides.update(_flag_overrides(args))
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    config = load_config(args.preset, args.config, overrides)
    gpus = getattr(args, "gpus_per_trial", None)
    if gpus is not None:  # the configuration's GPUs are shared by however many workers it ends up with
        config = config.replace({"train.gpus_per_worker": gpus / config.train.num_workers})
    return config


def experiment_config(args: argparse.Namespace, experiment: Any) -> Config:
    """The config a sweep of ``experiment`` (a catalogue entry) runs: the experiment's own defaults (with the demo
    preset, its demo defaults too) under the user's ``--set`` and flags, its ASR tracks checked (``_with_tracks``)."""
    return _with_tracks(build_config(args, experiment.base_overrides(args.preset)), experiment)


def _with_tracks(config: Config, experiment: Any = None) -> Config:
    """Before Ray starts: the ASR tracks the config's text sources (and the experiment's rows') read exist, named
    exactly in the config (``transcribe.ensure_text_tracks``); a config of gold text only is returned as it is."""
    from ser_platform.data.transcripts import GOLD

    sources = experiment.text_sources if experiment is not None else []
    if {config.data.train_text_source, config.data.test_text_source, *sources} == {GOLD}:
        return config
    from ser_platform.transcribe import ensure_text_tracks

    return ensure_text_tracks(config, sources)


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
    config = build_config(args, extra={"model.text.name": args.text_encoder, "model.speech.name": args.speech_encoder,
                                       "model.encoders": "frozen", "data.encoder_cache": ""})
    from ser_platform.frozen_encoders import cache_command

    return cache_command(config, args.dataset, root=args.out, batch_size=args.batch_size, device=args.device,
                         force=args.force, layers={"text": layers, "speech": layers} if layers else None)


def _cmd_train(args: argparse.Namespace) -> int:
    config = _with_tracks(build_config(args))
    from ser_platform.ray_train import train_command

    return train_command(config, ray_address=args.ray_address, verbose=args.verbose)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ser_platform.catalogue import GROUPS
    from ser_platform.catalogue import experiment as catalogue_entry
    from ser_platform.sweep import default_experiment, run_group, sweep_command

    if args.experiment in GROUPS:
        results = run_group([(e, experiment_config(args, e)) for e in GROUPS[args.experiment]], name=args.name,
                            resume=args.resume, ray_address=args.ray_address, verbose=args.verbose)
        return 0 if all(r.status == "FINISHED" for r in results) else 1
    if args.experiment is not None:
        experiment = catalogue_entry(args.experiment)
    else:  # the search, or Table 2's grid with --grid paper (sweep.grid); --resume reads it from the sweep
        experiment = None if args.resume else default_experiment(build_config(args))
    # --resume continues with the configuration the sweep stored (its tracks were checked when it started).
    config = build_config(args) if experiment is None else experiment_config(args, experiment)
    return sweep_command(config, experiment, name=args.name, resume=args.resume, ray_address=args.ray_address,
                         verbose=args.verbose)


def _cmd_tables(args: argparse.Namespace) -> int:
    from ser_platform.tables import tables_command

    return tables_command(experiment=args.mlflow_experiment, mlflow_uri=args.mlflow_uri, compare=args.compare)


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from ser_platform.transcribe import RecognizerSpec, transcribe_command

    spec = RecognizerSpec(args.model, revision=args.revision, device=args.device or "", batch_size=args.batch_size,
                          chunk_length_s=args.chunk_length, language=args.language, threads=args.threads)
    return transcribe_command(args.dataset, spec, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                              overwrite=args.overwrite, ray_address=args.ray_address, as_json=args.json,
                              shared_filesystem=args.shared_filesystem)


def _cmd_predict(args: argparse.Namespace) -> int:
    from ser_platform.predict import predict_command

    return predict_command(args.run, wav=args.wav, text=args.text, csv_path=args.csv, fold=args.fold,
                           mlflow_uri=args.mlflow_uri, as_json=args.json, asr=args.asr)


# --- parsers ---------------------------------------------------------------------------------------------------

def _add_data_commands(sub: Any) -> None:
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

    p = sub.add_parser("transcribe", help="speech recognition (Whisper) of every utterance into an ASR text track "
                                          "of the dataset (data.train_text_source / test_text_source = asr:MODEL), "
                                          "with its word error rate")
    p.add_argument("--dataset", required=True, help="Parquet dataset from `ser prepare` (a folder, s3:// or gs://)")
    p.add_argument("--model", required=True, help="Whisper checkpoint name (e.g. openai/whisper-large-v3) or local "
                                                  "folder; 'tiny' = a small random Whisper, offline (tests, demo)")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: the default branch)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is a GPU, else cpu")
    p.add_argument("--batch-size", type=int, default=8, help="utterances per forward pass (default 8)")
    p.add_argument("--chunk-length", type=float, default=30.0,
                   help="seconds per chunk of a long utterance (the pipeline's chunking; default 30, Whisper's window)")
    p.add_argument("--language", default="en", help="language forced on multilingual checkpoints (default en; "
                                                    "'' = detect it)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's default)")
    p.add_argument("--workers", type=int, help="Ray Data actors, each holding the model (default: in this process; "
                                               "with --ray-address or $RAY_ADDRESS, one per GPU of the cluster)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (default: 1 when the cluster "
                                                                      "has GPUs and --workers is not given)")
    p.add_argument("--ray-address", help="Ray cluster to run the actors on (default: $RAY_ADDRESS)")
    p.add_argument("--shared-filesystem", action="store_true", help="every node of the cluster mounts the local "
                                                                    "--dataset folder (else it must be s3:// or gs://)")
    p.add_argument("--overwrite", action="store_true", help="replace this model's track if the dataset has one")
    p.add_argument("--json", action="store_true", help="print the track's metadata (WER, cost) as JSON")
    p.set_defaults(func=_cmd_transcribe)


def _add_result_commands(sub: Any) -> None:
    p = sub.add_parser("tables", help="print the paper's tables from logged MLflow runs")
    p.add_argument("--mlflow-experiment", default="ser_platform", help="MLflow experiment name (default: "
                                                                       "ser_platform)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                        "sqlite:///mlflow.db in the working directory)")
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
    p.add_argument("--text", help="its transcript (with --wav); without it the wav is transcribed (--asr)")
    p.add_argument("--csv", help="CSV with columns wav,text, or wav alone to transcribe every row (relative wav "
                                 "paths: relative to the CSV's folder)")
    p.add_argument("--asr", metavar="MODEL", help="recognition model for utterances without text: a Whisper name "
                                                  "or folder, NAME@REVISION, or 'tiny' (default: the one whose "
                                                  "track the run was tested on, data.test_text_source)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                        "sqlite:///mlflow.db in the working directory)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ser", description="Multimodal speech emotion recognition experiments on Ray (IEMOCAP, focus attention, "
                                "joint triplet + cross-entropy loss).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(sub)

    p = sub.add_parser("model-summary", help="print the model's parameters per part")
    _add_config_args(p)
    p.set_defaults(func=_cmd_model_summary)

    p = sub.add_parser("train", help="train one configuration on leave-one-session-out folds (Ray Train DDP)")
    _add_config_args(p)
    _add_run_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sweep", help="Ray Tune over a catalogue experiment; every trial runs all folds")
    _add_config_args(p)
    _add_run_args(p)
    _add_sweep_args(p, choose_experiment=True, grid=True)
    p.set_defaults(func=_cmd_sweep)

    _add_result_commands(sub)
    for command in sub.choices.values():
        _add_debug(command)
    return parser


def experiment_parser(key: str, prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of an experiment script: ``ser sweep``'s flags with ``--experiment`` fixed to ``key``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(parser)
    _add_run_args(parser)
    _add_sweep_args(parser, choose_experiment=False, grid=key == "search")
    _add_debug(parser)
    parser.set_defaults(func=_cmd_sweep, experiment=None if key == "search" else key, command="sweep")
    return parser


# --- the error boundary ------------------------------------------------------------------------------------------

def _expected(err: BaseException) -> bool:
    """A failure a user can cause and fix (say it in one line), as opposed to a bug (keep the traceback): I/O and
    permissions, corrupt files pyarrow cannot read, and the package's own ValueErrors (ConfigError, DataError,
    TrackingError, ...), also when Ray re-raises them from a worker (its error classes subclass the cause's)."""
    import pyarrow

    if isinstance(err, (OSError, pyarrow.ArrowException)):
        return True
    return isinstance(err, ValueError) and any(c.__module__.startswith("ser_platform") for c in type(err).__mro__)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its command behind the error boundary (module docstring); the exit code."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage error argparse has already printed (2)
        return stop.code if isinstance(stop.code, int) else EXIT_ERROR
    debug = getattr(args, "debug", False) or os.environ.get("SER_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        # A library that caught the same Ctrl-C (pyarrow's stop handler) may raise it again while the stack
        # unwinds, which would end the process by SIGINT instead of exit 130: the rest of the way is ignored.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as stop:  # SIGTERM/SIGHUP while a folder was being written (data.atomic_folder)
        if isinstance(stop.code, int) and stop.code > 128:
            print(f"{parser.prog}: stopped by signal {stop.code - 128}; nothing half-written was left",
                  file=sys.stderr)
        raise
    except Exception as err:
        if debug or not _expected(err):
            raise
        name = f"{parser.prog} {args.command}" if parser.prog == "ser" else parser.prog
        print(f"{name}: error: {_one_line(err)} (--debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


def experiment_main(key: str, doc: str, argv: Sequence[str] | None = None) -> int:
    """An experiment script's entry point (``experiments/*.py``): ``ser sweep --experiment KEY`` under the script's
    own name and docstring."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else f"{key}.py"
    return run_command(experiment_parser(key, prog, doc), argv)


if __name__ == "__main__":
    sys.exit(main())
