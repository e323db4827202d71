"""What each kind of run logs (the layout in ``tracking.schema``): the sweep's parent run, a trial's run, a fold's
run (from Ray Train's rank 0) and the run of a ``ser train`` invocation.

Every run is found again by its tags when the same thing runs again (``runs.find_or_start_run``): a restarted
Tune trial finds its trial run, a worker restored from a checkpoint its fold runs, ``ser train`` rerun with the
same name its run; nothing is logged twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ser_platform.tracking import schema
from ser_platform.tracking.runs import MlflowRun, find_or_start_run, log_confusion, log_model, start_run


# --- a sweep's parent run ------------------------------------------------------------------------------------

def open_sweep_run(uri: str, experiment_id: str, name: str, *, kind: str, table: str, variants: Sequence[str],
                   varied: Sequence[str], config: Any) -> MlflowRun:
    """Create the sweep's parent run. Its params: the UI keys (``schema.LABELS``; its variant names the rows, or
    "search"), the kind of sweep, and the dotted config keys its trials share: not the ``varied`` ones (what a
    row or the search sets), which would read as if the whole sweep ran with the base config's value."""
    from ser_platform.tracking.runs import config_params

    run = start_run(uri, experiment_id, run_name=name, tags={
        schema.ROLE_TAG: schema.ROLE_SWEEP, schema.SWEEP_TAG: name, schema.KIND_TAG: kind})
    shared = {k: v for k, v in config_params(config).items() if k not in set(varied)}
    variant = "rows: " + "; ".join(variants) if variants else schema.SEARCH_VARIANT
    run.log_params({**shared, **schema.labels(config, table=table, variant=variant), schema.SWEEP_KIND: kind})
    return run


def finish_sweep_run(run: MlflowRun, *, status: str, trials_complete: int, trials_errored: int,
                     wall_seconds: float, best: tuple[str, Mapping[str, float]] | None) -> None:
    """The sweep's own metrics, its best trial (``best = (run_id, metrics)``) and its final status."""
    metrics = {schema.TRIALS_COMPLETE: float(trials_complete), schema.TRIALS_ERRORED: float(trials_errored),
               schema.SWEEP_WALL_SECONDS: float(wall_seconds)}
    if best is not None:
        best_id, best_metrics = best
        metrics.update({f"best_{k}": v for k, v in best_metrics.items() if k in schema.SUMMARY_METRICS})
        run.set_tags({schema.BEST_TRIAL_TAG: best_id})
    run.log_metrics(metrics)
    run.set_status(status)


def log_table_artifacts(run: MlflowRun, slug: str, data: Mapping[str, Sequence[Any]], markdown: str) -> list[str]:
    """One table on a sweep's parent run, as an MLflow table and as markdown; the artifact paths."""
    paths = [f"{schema.TABLES_DIR}/{slug}.json", f"{schema.TABLES_DIR}/{slug}.md"]
    run.log_table(data, paths[0])
    run.log_text(markdown, paths[1])
    return paths


# --- a trial's run ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialIdentity:
    """What names a trial's run: its sweep, its Tune trial id, and the table row it fills."""

    sweep_name: str
    parent_run_id: str
    trial_id: str
    table: str
    variant: str
    kind: str

    def tags(self) -> dict[str, str]:
        """Tags the trial run and its fold runs carry: how a restarted trial finds them again."""
        return {schema.SWEEP_TAG: self.sweep_name, schema.TRIAL_ID_TAG: self.trial_id}

    def labels(self, config: Any) -> dict[str, str]:
        """The UI keys (``schema.LABELS``) of the trial's run and its fold runs."""
        return schema.labels(config, table=self.table, variant=self.variant)

    @property
    def run_name(self) -> str:
        return f"trial {self.trial_id}" if self.variant == schema.SEARCH_VARIANT else f"{self.variant} [{self.trial_id}]"


def trial_params(config: Any, trial: TrialIdentity) -> dict[str, Any]:
    """Params of a trial run besides the dotted config keys: the UI keys, the seed, the sweep's kind, the trial."""
    return {**trial.labels(config), schema.SEED: config.train.seed, schema.SWEEP_KIND: trial.kind,
            schema.TRIAL_ID: trial.trial_id}


def open_trial_run(uri: str, experiment_id: str, trial: TrialIdentity, config: Any) -> MlflowRun:
    """The trial's run (child of the sweep's run): the one a previous attempt of this trial left (a restarted
    trial), else a new one carrying the trial's params."""
    from ser_platform.tracking.runs import config_params

    run, created = find_or_start_run(uri, experiment_id, run_name=trial.run_name, parent_run_id=trial.parent_run_id,
                                     tags={schema.ROLE_TAG: schema.ROLE_TRIAL, **trial.tags()})
    if created:
        run.log_params(config_params(config, trial_params(config, trial)))
    return run


def trial_metrics(result: Any) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """(fold summary, per-fold series) of a ``train.TrialResult``: the summary of ``ray_train.train_folds`` (mean
    and std over folds, x seeds) and the number of folds that completed; the series are logged with step = fold.

    With several seeds (``result.per_seed``) each ``fold_*`` series holds the fold's mean over its seeds (so a
    paired comparison by fold compares seed-averaged scores, the stricter choice, see ``comparison.py``), and
    ``fold_test_wa.seed<S>`` / ``fold_test_ua.seed<S>`` hold every (fold, seed) score."""
    folds = sorted(result.per_fold)
    summary = {key: float(value) for key, value in result.summary.items() if isinstance(value, (int, float))}
    summary[schema.FOLDS_COMPLETED] = float(len(folds))
    per_seed = getattr(result, "per_seed", None) or {0: result.per_fold}

    def fold_means(key: str) -> dict[int, float]:
        return {f: float(np.mean([getattr(runs[f], key) for runs in per_seed.values()])) for f in folds}

    series = {schema.fold_series(key): fold_means(key) for key in schema.FOLD_SERIES_KEYS}
    if len(per_seed) > 1:
        for seed, runs in sorted(per_seed.items()):
            for key in ("test_wa", "test_ua"):
                series[schema.fold_series(key, seed)] = {f: float(getattr(runs[f], key)) for f in folds}
    return summary, series


def log_trial_result(run: MlflowRun, result: Any) -> dict[str, float]:
    """Log a ``TrialResult`` on the trial run (summary at step 0, per-fold series at step = fold), mark it
    FINISHED, return the summary."""
    summary, series = trial_metrics(result)
    by_step: dict[int, dict[str, float]] = {0: dict(summary)}
    for key, values in series.items():
        for fold, value in values.items():
            by_step.setdefault(fold, {})[key] = value
    run.log_series(by_step)
    run.set_status("FINISHED")
    return summary


def logged_summary(run: MlflowRun, folds_expected: int) -> dict[str, float] | None:
    """The fold summary of a trial run that already finished (killed after logging, before Tune saved it)."""
    stored = run.info()
    metrics = stored.data.metrics
    if stored.info.status == "FINISHED" and int(metrics.get(schema.FOLDS_COMPLETED, -1)) == folds_expected:
        return {k: float(v) for k, v in metrics.items()
                if k in schema.SUMMARY_METRICS or k == schema.FOLDS_COMPLETED}
    return None


# --- a `ser train` run -------------------------------------------------------------------------------------------

def open_train_run(uri: str, experiment_id: str, train_run: str, config: Any, params: Mapping[str, Any],
                   tags: Mapping[str, Any] | None = None) -> MlflowRun:
    """The run of a ``ser train`` invocation (the parent of its fold runs), found again by its Train run name;
    ``params``: the provenance params and the UI keys its fold runs carry too."""
    run, created = find_or_start_run(uri, experiment_id, run_name=train_run, tags={
        **dict(tags or {}), schema.ROLE_TAG: schema.ROLE_TRAIN, schema.TRAIN_RUN_TAG: train_run})
    if created:
        run.log_config(config, params)
    return run


# --- fold runs (Ray Train's rank 0) --------------------------------------------------------------------------

@dataclass(frozen=True)
class FoldRunContext:
    """Where a configuration's fold runs go and what they carry besides the config; picklable (it travels to the
    Ray Train workers). ``train_run`` is the Ray Train run name (one per seed), ``speakers`` maps a fold to its
    (test speakers, validation speakers), ``params`` are the provenance params (git commit, dataset) and the UI
    keys (``schema.LABELS``)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    train_run: str
    speakers: Mapping[int, tuple[Sequence[str], Sequence[str]]]
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    num_seeds: int = 1


class FoldLogger:
    """MLflow from rank 0: one run per fold nested under the context's parent, found again (by tags) after a
    restart so a fold never gets two runs."""

    def __init__(self, config: Any, context: FoldRunContext):
        self.config = config
        self.context = context
        self.runs: dict[int, MlflowRun] = {}

    def _run(self, fold: int) -> tuple[MlflowRun, bool]:
        if fold in self.runs:
            return self.runs[fold], False
        ctx, seed = self.context, self.config.train.seed
        test_speakers, val_speakers = ctx.speakers[fold]
        name = f"fold={fold}" + (f" seed={seed}" if ctx.num_seeds > 1 else "")
        run, created = find_or_start_run(ctx.tracking_uri, ctx.experiment_id, run_name=name,
                                         parent_run_id=ctx.parent_run_id, tags={
            **ctx.tags, schema.ROLE_TAG: schema.ROLE_FOLD, schema.FOLD_TAG: fold, schema.TRAIN_RUN_TAG: ctx.train_run,
            schema.PROTOCOL: self.config.data.protocol, "test_speakers": ",".join(sorted(test_speakers)),
            "val_speakers": ",".join(sorted(val_speakers)), schema.SEED_TAG: seed})
        if created:
            run.log_config(self.config, {**ctx.params, "fold": fold})
        self.runs[fold] = run
        return run, created

    def start(self, fold: int) -> None:
        self._run(fold)

    def epoch(self, fold: int, epoch: int, metrics: Mapping[str, float]) -> None:
        run, _ = self._run(fold)
        run.log_metrics({k: v for k, v in metrics.items() if k not in ("fold", "epoch")}, step=epoch)

    def log_model(self, fold: int, result: Any, weights: Mapping[str, Any]) -> int:
        """The selected weights + resolved config as artifacts ``model/`` of the fold run (``ser predict``)."""
        from ser_platform.data.iemocap import CLASSES

        run, _ = self._run(fold)
        return log_model(run, weights, self.config, info={
            "fold": fold, "seed": self.config.train.seed, "best_epoch": result.best_epoch, "val_ua": result.val_ua,
            "test_ua": result.test_ua, "classes": list(CLASSES), "train_run": self.context.train_run})

    def finish(self, fold: int, result: Any, *, with_history: bool = False) -> None:
        """The fold's final scores (overall and per subset), its confusion matrix and result; FINISHED."""
        from ser_platform.data.iemocap import CLASSES

        run, _ = self._run(fold)
        if with_history:
            run.log_series({int(e["epoch"]): {k: v for k, v in e.items() if k != "epoch"} for e in result.history})
        final = {"test_wa": result.test_wa, "test_ua": result.test_ua, "best_epoch": float(result.best_epoch),
                 "best_val_wa": result.val_wa, "best_val_ua": result.val_ua, "epochs_run": float(result.epochs_run),
                 "num_test": float(result.num_test)}
        for subset, scores in result.subsets.items():
            if scores.get("n", 0) > 0:
                final.update({f"test_wa_{subset}": scores["wa"], f"test_ua_{subset}": scores["ua"],
                              f"num_test_{subset}": float(scores["n"])})
        run.log_metrics(final, step=result.epochs_run)
        if result.resumed_from:
            run.set_tags({schema.RESUMED_FROM_TAG: ",".join(str(e) for e in result.resumed_from)})
        log_confusion(run, result.confusion, CLASSES)
        run.log_dict(result.to_dict(), schema.FOLD_RESULT_ARTIFACT)
        run.set_status("FINISHED")

    def ensure_finished(self, fold: int, result: Any) -> None:
        """A fold restored as finished from a checkpoint: make sure its run holds the result (an interrupted
        earlier attempt may have died before logging it, or its run may have been deleted)."""
        run, created = self._run(fold)
        if created or run.status() != "FINISHED":
            self.finish(fold, result, with_history=True)
