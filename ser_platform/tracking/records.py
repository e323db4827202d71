"""Logged runs read back as typed records: what the tables, the paired comparisons and ``ser predict`` consume.

    collect_sweeps(uri, experiment_id)          -> [SweepRecord] (parent runs with their trial runs), oldest first
    fold_scores(uri, trial, metric, by_seed)    -> {(fold, seed): score} from a trial's per-fold series
    find_trial(uri, experiment_id, ref)         -> the complete TrialRecord a run id, run name or variant names
    find_fold_run(uri, run_id, fold=None)       -> the FoldRunRecord a fold, trial, train or sweep run stands for
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

from ser_platform.tracking import schema
from ser_platform.tracking.runs import MlflowRun
from ser_platform.tracking.store import TrackingError


# --- trials and sweeps ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialRecord:
    """One logged trial run: the configuration (params), the fold summary (metrics), its state."""

    run_id: str
    run_name: str
    parent_run_id: str
    status: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]

    @property
    def table(self) -> str:
        return self.params.get(schema.TABLE, "")

    @property
    def variant(self) -> str:
        return self.params.get(schema.VARIANT, "")

    @property
    def protocol(self) -> str:
        return self.params.get(schema.PROTOCOL, "?")

    @property
    def label(self) -> str:
        return self.run_name or self.run_id

    @property
    def folds_expected(self) -> int:
        return len([f for f in self.params.get(schema.FOLDS, "").split(",") if f.strip()])

    @property
    def folds_completed(self) -> int:
        value = self.metrics.get(schema.FOLDS_COMPLETED, 0.0)
        return int(value) if math.isfinite(value) else 0

    @property
    def complete(self) -> bool:
        """FINISHED with every configured fold scored: the only trials a table row takes."""
        return (self.status == "FINISHED" and self.folds_expected > 0
                and self.folds_completed == self.folds_expected and "test_ua_mean" in self.metrics)

    def param_float(self, key: str) -> float:
        return float(self.params[key])

    def seeds(self) -> list[int]:
        """The seeds whose per-fold scores were logged separately (``fold_test_ua.seed<S>``, train.seeds > 1)."""
        found = (schema.seed_of_series(name, "test_ua") for name in self.metrics)
        return sorted(seed for seed in found if seed is not None)

    def state(self) -> str:
        return f"{self.status.lower()}, {self.folds_completed}/{self.folds_expected} folds"


@dataclass(frozen=True)
class SweepRecord:
    """A parent run and its trial runs."""

    run_id: str
    name: str
    kind: str
    start_time: int
    trials: tuple[TrialRecord, ...]

    def with_trials(self, trials: tuple[TrialRecord, ...]) -> "SweepRecord":
        return SweepRecord(self.run_id, self.name, self.kind, self.start_time, trials)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _trial_record(run: Any) -> TrialRecord:
    return TrialRecord(
        run_id=run.info.run_id, run_name=run.info.run_name or "",
        parent_run_id=run.data.tags.get(schema.PARENT_RUN_TAG, ""), status=run.info.status,
        start_time=int(run.info.start_time or 0), params=dict(run.data.params),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
    )


def _search_all(uri: str, experiment_id: str, filter_string: str) -> list[Any]:
    client, runs, token = _client(uri), [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _role(role: str) -> str:
    return f"tags.`{schema.ROLE_TAG}` = '{role}'"


def collect_sweeps(uri: str, experiment_id: str, parent_run_id: str | None = None) -> list[SweepRecord]:
    """Sweeps (parent runs) of an experiment with their trial runs, oldest first; one sweep if ``parent_run_id``."""
    if parent_run_id is not None:
        parents = [_client(uri).get_run(parent_run_id)]
        trials = _search_all(uri, experiment_id, f"{_role(schema.ROLE_TRIAL)} and "
                                                 f"tags.`{schema.PARENT_RUN_TAG}` = '{parent_run_id}'")
    else:
        parents = _search_all(uri, experiment_id, _role(schema.ROLE_SWEEP))
        trials = _search_all(uri, experiment_id, _role(schema.ROLE_TRIAL))
    by_parent: dict[str, list[TrialRecord]] = {}
    for run in trials:
        record = _trial_record(run)
        by_parent.setdefault(record.parent_run_id, []).append(record)
    sweeps = [
        SweepRecord(run_id=p.info.run_id, name=p.info.run_name or p.data.tags.get(schema.SWEEP_TAG, ""),
                    kind=p.data.tags.get(schema.KIND_TAG, ""), start_time=int(p.info.start_time or 0),
                    trials=tuple(sorted(by_parent.get(p.info.run_id, []), key=lambda t: t.start_time)))
        for p in parents
    ]
    return sorted(sweeps, key=lambda s: s.start_time)


def latest_complete(records: Any) -> TrialRecord | None:
    complete = [r for r in records if r.complete]
    return max(complete, key=lambda r: r.start_time) if complete else None


def fold_scores(uri: str, record: TrialRecord, metric: str, *, by_seed: bool) -> dict[tuple[int, int], float]:
    """(fold, seed) -> score of ``metric`` ("test_ua", "test_wa") as logged by the trial's ``fold_<metric>``
    series (step = fold). ``by_seed=False``: one score per fold, the mean over its seeds, keyed (fold, 0)."""
    client = _client(uri)

    def history(key: str) -> dict[int, float]:
        # A restarted trial may log a fold twice; the latest value wins.
        return {int(m.step): float(m.value)
                for m in sorted(client.get_metric_history(record.run_id, key), key=lambda m: m.timestamp)}

    seeds = record.seeds()
    if not by_seed:
        return {(fold, 0): value for fold, value in history(schema.fold_series(metric)).items()}
    if not seeds:  # one seed: the plain series is that seed's
        seed = int(record.params.get(schema.SEED, "0"))
        return {(fold, seed): value for fold, value in history(schema.fold_series(metric)).items()}
    return {(fold, seed): value for seed in seeds
            for fold, value in history(schema.fold_series(metric, seed)).items()}


def find_trial(uri: str, experiment_id: str, ref: str) -> TrialRecord | None:
    """A complete trial run by run id, run name or variant name (the latest complete one when several match)."""
    from mlflow.exceptions import MlflowException

    try:
        run = _client(uri).get_run(ref)
        if run.info.experiment_id == experiment_id or not experiment_id:
            return _trial_record(run)
    except MlflowException:
        pass
    quoted = ref.replace("'", "\\'")
    for filter_string in (f"attributes.run_name = '{quoted}' and {_role(schema.ROLE_TRIAL)}",
                          f"params.{schema.VARIANT} = '{quoted}' and {_role(schema.ROLE_TRIAL)}"):
        best = latest_complete(_trial_record(r) for r in _search_all(uri, experiment_id, filter_string))
        if best is not None:
            return best
    return None


# --- fold runs (what `ser predict` loads) ----------------------------------------------------------------------

@dataclass(frozen=True)
class FoldRunRecord:
    """A fold run: its handle, fold number, status and the names of its ``model/`` artifacts."""

    run: MlflowRun
    fold: int
    status: str


def _fold_children(client: Any, run: Any) -> list[Any]:
    children = client.search_runs(
        [run.info.experiment_id], max_results=1000,
        filter_string=f"tags.`{schema.PARENT_RUN_TAG}` = '{run.info.run_id}' and {_role(schema.ROLE_FOLD)}")

    def order(r: Any) -> tuple:
        return (int(r.data.tags.get(schema.FOLD_TAG, 0)), int(r.data.params.get("train.seed", 0)),
                r.info.start_time or 0)

    return sorted(children, key=order)


def _fold_record(uri: str, run: Any) -> FoldRunRecord:
    return FoldRunRecord(MlflowRun(uri, run.info.run_id), int(run.data.tags.get(schema.FOLD_TAG, 0)),
                         run.info.status)


def find_fold_run(uri: str, run_id: str, fold: int | None = None,
                  say: Callable[[str], None] | None = None) -> FoldRunRecord:
    """The fold run ``run_id`` stands for: itself if it is a fold run; a train or trial run's fold ``fold``
    (default: the lowest, with a line to ``say``); a sweep's best trial's (tag ``best_trial_run_id``).
    ``TrackingError`` names the run and what it has instead."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    say = say or (lambda line: print(line, file=sys.stderr))
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"--run {run_id}: no such MLflow run at {uri}") from None
    role = run.data.tags.get(schema.ROLE_TAG, "")
    if role == schema.ROLE_SWEEP:
        best = run.data.tags.get(schema.BEST_TRIAL_TAG)
        if not best:
            raise TrackingError(f"--run {run_id} is a sweep with no best trial (tag {schema.BEST_TRIAL_TAG}): pass "
                                f"one of its trial runs or fold runs")
        say(f"run {run_id} is a sweep: using its best trial run {best}")
        run = client.get_run(best)
        role = run.data.tags.get(schema.ROLE_TAG, "")
    if role == schema.ROLE_FOLD:
        record = _fold_record(uri, run)
        if fold is not None and record.fold != fold:
            raise TrackingError(f"--run {run_id} is the run of fold {record.fold}, not of --fold {fold}")
        return record
    folds = [_fold_record(uri, r) for r in _fold_children(client, run)]
    if not folds:
        raise TrackingError(f"--run {run.info.run_id} ({role or 'no ser.role tag'}) has no fold runs under it")
    available = sorted({r.fold for r in folds})
    if fold is None:
        say(f"run {run.info.run_id} is a {role or 'parent'} run: using its fold {folds[0].fold} (run "
            f"{folds[0].run.run_id}); folds there: {available} (pass --fold)")
        return folds[0]
    matching = [r for r in folds if r.fold == fold]
    if not matching:
        raise TrackingError(f"--fold {fold}: run {run.info.run_id} has fold runs for folds {available} only")
    return matching[0]
