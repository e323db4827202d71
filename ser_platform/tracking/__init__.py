"""MLflow, owned here: no other module of the package imports ``mlflow``.

    schema      every tag, param, metric and artifact name (the run layout is in its docstring)
    store       the tracking URI, a store that exists before anyone writes, experiments
    runs        ``MlflowRun`` (a picklable handle that logs to one run), the one find-or-create, model artifacts
    loggers     what the sweep's parent run, a trial run, a fold run and a ``ser train`` run log
    records     logged runs read back as typed records (tables, comparisons, ``ser predict``)
    provenance  what identifies a run's inputs: git commit, dataset fingerprint

The names below are the package's public surface; import them from ``ser_platform.tracking``.
"""

from ser_platform.tracking.loggers import (FoldLogger, FoldRunContext, TrialIdentity, finish_sweep_run,
                                           log_table_artifacts, log_trial_result, logged_summary, open_sweep_run,
                                           open_train_run, open_trial_run, trial_metrics)
from ser_platform.tracking.provenance import dataset_fingerprint, git_commit
from ser_platform.tracking.records import (FoldRunRecord, SweepRecord, TrialRecord, collect_sweeps, find_fold_run,
                                           find_trial, fold_scores, latest_complete)
from ser_platform.tracking.runs import (MlflowRun, config_params, find_or_start_run, frozen_encoder_keys,
                                        log_confusion, log_model, start_run)
from ser_platform.tracking.store import (TrackingError, check_tracking_server, ensure_store, ensure_store_started,
                                         existing_experiment_id, experiment_id, open_store, quiet_logging,
                                         resolve_tracking_uri, tracking_uri)

__all__ = [
    "FoldLogger", "FoldRunContext", "FoldRunRecord", "MlflowRun", "SweepRecord", "TrackingError", "TrialIdentity",
    "TrialRecord", "check_tracking_server", "collect_sweeps", "config_params", "dataset_fingerprint", "ensure_store",
    "ensure_store_started", "existing_experiment_id", "experiment_id", "find_fold_run", "find_or_start_run",
    "find_trial", "fold_scores", "finish_sweep_run", "frozen_encoder_keys", "git_commit", "latest_complete",
    "log_confusion", "log_model",
    "log_table_artifacts", "log_trial_result", "logged_summary", "open_store", "open_sweep_run", "open_train_run",
    "open_trial_run", "quiet_logging", "resolve_tracking_uri", "start_run", "tracking_uri", "trial_metrics",
]
