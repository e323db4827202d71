"""The run schema: every tag, param, metric and artifact name the platform writes to MLflow and reads back.

Writers (``tracking.loggers``) and readers (``tracking.records``, the tables, ``ser predict``) import these names
instead of spelling them, so a typo is an ImportError, not an empty table row.

    sweep run   tags: ser.role=sweep, ser.sweep, ser.kind (the catalogue key); best_trial_run_id at the end
                params: the LABELS, sweep.kind, and the dotted config keys its trials share (not those a row
                or the search sets); metrics: trials complete / errored, the best trial's summary
    └ trial run tags: ser.role=trial, ser.sweep, ser.trial_id, mlflow.parentRunId
                params: the LABELS, every dotted config key, seed, sweep.kind, trial_id; metrics: the fold summary
                (SUMMARY_METRICS), folds_completed, per-fold series
      └ fold run tags: ser.role=fold, ser.fold, ser.seed, ser.train_run, test/val speakers (+ the trial's tags);
                 params: the LABELS, every dotted config key, git_commit, dataset_path, dataset_fingerprint, fold;
                 metrics per epoch and the final test scores; artifacts below
    train run   (``ser train``: in place of sweep and trial) tags: ser.role=train, ser.train_run; params as a
                fold run's, without fold
"""

from __future__ import annotations

from ser_platform.config import REPORTED_METRICS

PARENT_RUN_TAG = "mlflow.parentRunId"  # how MLflow (and its UI) nests runs

ROLE_TAG = "ser.role"
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
ROLE_FOLD = "fold"
ROLE_TRAIN = "train"  # a `ser train` invocation: the parent of its fold runs

SWEEP_TAG = "ser.sweep"  # the sweep's name, on its parent and trial runs
KIND_TAG = "ser.kind"  # the catalogue key of the sweep's experiment, on its parent run
TRIAL_ID_TAG = "ser.trial_id"  # Tune's trial id: how a restarted trial finds its run again
TRAIN_RUN_TAG = "ser.train_run"  # the Ray Train run name: how a restarted worker finds its fold runs again
FOLD_TAG = "ser.fold"
SEED_TAG = "ser.seed"  # a fold run's training seed (train.seeds > 1 gives a fold one run per seed)
RESUMED_FROM_TAG = "ser.resumed_from_epochs"  # epochs whose checkpoint a restarted fold continued from
BEST_TRIAL_TAG = "best_trial_run_id"  # on a sweep's parent run: its best complete trial

# The keys a user filters and sorts by in the MLflow UI: params, on a sweep's parent run, each trial run and each
# fold run alike (``params.table = "1"`` finds them all). A parent's variant names what its trials vary
# ("rows: A; B" of a grid, "search" of an Optuna search); ``ser train`` runs carry protocol, folds and seeds.
TABLE = "table"
VARIANT = "variant"
PROTOCOL = "protocol"
FOLDS = "folds"
SEED = "seed"
SEEDS = "seeds"
SWEEP_KIND = "sweep.kind"
TRIAL_ID = "trial_id"
SEARCH_VARIANT = "search"  # the variant of an Optuna trial (its point is in its params)
LABELS = (TABLE, VARIANT, PROTOCOL, FOLDS, SEEDS)


def labels(config, *, table: str = "", variant: str = "") -> dict[str, str]:
    """The UI keys of a run of ``config`` (``LABELS``; table and variant only for a sweep's runs)."""
    values = {TABLE: table, VARIANT: variant, PROTOCOL: config.data.protocol,
              FOLDS: ",".join(str(f) for f in config.data.folds), SEEDS: str(config.train.seeds)}
    return {key: value for key, value in values.items() if value != ""}

# What a trial reports, mean and sample std over its folds (x seeds); the sweep's objective (sweep.metric, which
# the config validates against the same tuple) is one of them.
SUMMARY_METRICS = REPORTED_METRICS
FOLDS_COMPLETED = "folds_completed"
# Per-fold series on a trial run, logged with step = fold number (see ``fold_series``).
FOLD_SERIES_KEYS = ("val_ua", "val_wa", "test_wa", "test_ua", "best_epoch")
# On the sweep's parent run.
TRIALS_COMPLETE = "trials_complete"
TRIALS_ERRORED = "trials_errored"
SWEEP_WALL_SECONDS = "sweep_wall_seconds"

# Artifacts.
TABLES_DIR = "tables"  # on a sweep's parent run: tables/<slug>.md and tables/<slug>.json
CONFUSION_ARTIFACT = "confusion_test"  # on a fold run: .json and .png
FOLD_RESULT_ARTIFACT = "fold_result.json"
CONFIG_ARTIFACT = "config.yaml"
MODEL_ARTIFACT_DIR = "model"  # a fold run's selected weights, what `ser predict` loads
MODEL_WEIGHTS_FILE = "state_dict.pt"  # torch.save of the plain model's state dict (CPU tensors)
MODEL_CONFIG_FILE = "config.json"  # the resolved config, Config.to_dict()
MODEL_INFO_FILE = "info.json"  # fold, selected epoch, validation scores, classes, which weights were left out
MODEL_FORMAT_VERSION = 1
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def fold_series(key: str, seed: int | None = None) -> str:
    """The name of a per-fold series on a trial run: ``fold_test_ua``, or ``fold_test_ua.seed3`` for one seed's
    scores when the trial ran several seeds (the plain series then holds each fold's mean over its seeds)."""
    return f"fold_{key}" + ("" if seed is None else f".seed{seed}")


def seed_of_series(name: str, key: str) -> int | None:
    """The seed of a ``fold_<key>.seed<S>`` series name, None for any other name."""
    prefix = fold_series(key) + ".seed"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None
