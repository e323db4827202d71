"""Ray Tune over a catalogue experiment (``catalogue.py``): one trial = one configuration trained and scored on
every fold of the protocol.

* an Optuna search (``search``): TPE (seeded) over the experiment's search space, dotted config keys;
* a grid (``grid``, ``ablation``, ``embedding_space``, ``compare_models``): Tune's grid over the experiment's rows.

Each trial calls ``ray_train.train_folds`` (Ray Train, every fold of ``config.data.folds``) and reports once, with
the mean and std over folds. The objective is ``config.sweep.metric``, by default ``val_ua_mean``: UA measured on
the validation speakers of the training sessions, so the search never sees a test session; test WA/UA are logged
beside it and are what the tables show.

MLflow (``tracking.loggers``): a parent run per sweep, a child run per trial, a grandchild run per fold (made by
``train_folds``). The sweep's parent run id, its configuration and where its Optuna study lives are kept in
``<storage>/<name>/ser_sweep.json``, so ``--resume`` continues the same sweep under the same parent run: Tune
restores its experiment state, finished trials are kept, unfinished ones run again under their own trial id and
MLflow run. Tune restarts such a trial function from its start; ``train_folds`` is then called with the same Train
run name (``trial=<id>``) and storage, so Ray Train continues from the last epoch checkpoint and the fold runs are
found again by their tags, not duplicated.

No early stopping (ASHA and friends): a trial reports once, after all its folds, because a table row is only
comparable to another when both cover every fold; stopping on the first folds would rank configurations by
whichever sessions come first. The tables take complete trials only (``folds_completed`` = folds configured).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ser_platform import tracking
from ser_platform.catalogue import PAPER_GRID, SEARCH, Experiment, experiment as catalogue_entry, trial_overrides
from ser_platform.cluster import (DEFAULT_STORAGE, absolute_location, check_before_ray, is_local, join_storage,
                                  prepare_run, resolve_storage)
from ser_platform.config import Config, ConfigError, from_dict
from ser_platform.console import Console, worker_lines
from ser_platform.resources import TRIAL_RESOURCES
from ser_platform.tables import Table, format_table, log_tables, sweep_tables
from ser_platform.tracking.store import is_server, sqlite_path

META_FILE = "ser_sweep.json"


def search_space(experiment: Experiment = SEARCH) -> dict[str, Any]:
    """The experiment's search space as Tune distributions, keyed by dotted config keys (Tune hands them to the
    trial as overrides)."""
    from ray import tune

    make = {"uniform": lambda p: tune.uniform(p.low, p.high), "loguniform": lambda p: tune.loguniform(p.low, p.high),
            "choice": lambda p: tune.choice(list(p.choices))}
    return {p.key: make[p.kind](p) for p in experiment.space}


def default_experiment(config: Config) -> Experiment:
    """``ser sweep`` without ``--experiment``: the Optuna search, or Table 2's grid with ``sweep.grid = paper``."""
    return PAPER_GRID if config.sweep.grid == "paper" else SEARCH


# --- one trial ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its parameters; pickled into the trial by Tune."""

    base_config: dict[str, Any]
    experiment: Experiment
    sweep_name: str
    mlflow_uri: str
    mlflow_experiment_id: str
    parent_run_id: str
    train_storage: str
    train_fn: Callable[..., Any] | None = None  # None: ser_platform.ray_train.train_folds
    progress: Any = None  # the console's channel: where the workers' lines go (console.Console)

    def identity(self, trial_id: str, variant: str) -> tracking.TrialIdentity:
        return tracking.TrialIdentity(sweep_name=self.sweep_name, parent_run_id=self.parent_run_id,
                                      trial_id=trial_id, table=self.experiment.table, variant=variant,
                                      kind=self.experiment.key)


def run_trial(params: dict[str, Any], ctx: TrialContext, fold_data: Any = None) -> None:
    """One Tune trial: the configuration of ``params`` on every fold, reported once as the mean/std over folds.
    ``fold_data``: the splits the sweep's driver prepared (``ray_train.FoldData``), for the default train_fn."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    variant, overrides = trial_overrides(ctx.experiment, params)
    config = from_dict(ctx.base_config).replace(overrides)
    identity = ctx.identity(trial_id, variant)
    run = tracking.open_trial_run(ctx.mlflow_uri, ctx.mlflow_experiment_id, identity, config)
    done = tracking.logged_summary(run, len(config.data.folds))
    if done is not None:
        tune.report({**done, "trial_run_id": run.run_id})
        return
    if run.status() != "RUNNING":  # an earlier attempt of this trial failed or was killed: it runs again
        run.set_status("RUNNING")
    # Said as soon as the trial runs: its first epoch line follows only once Ray Train has started (tens of seconds
    # on a laptop), and a console silent that long looks hung.
    worker_lines(ctx.progress, f"trial {trial_id} | ")(f"started ({_point(params)}), "
                                                      f"{len(config.data.folds)} fold(s) to train")
    extra = {}
    if ctx.train_fn is None:
        from ser_platform.ray_train import train_folds as train_fn

        extra = {"fold_data": fold_data}
    else:
        train_fn = ctx.train_fn
    try:
        result = train_fn(config, run_name=f"trial={trial_id}", storage_path=ctx.train_storage,
                          parent_run_id=run.run_id, tags=identity.tags(), labels=identity.labels(config),
                          progress=ctx.progress, **extra)
        summary = tracking.log_trial_result(run, result)
    except BaseException:
        run.set_status("FAILED")
        raise
    tune.report({**summary, "trial_run_id": run.run_id})


# --- the sweep's state in its storage -----------------------------------------------------------------------------

def _read_meta(sweep_dir: str) -> dict[str, Any] | None:
    import pyarrow.fs

    fs, path = resolve_storage(sweep_dir)
    if fs.get_file_info(f"{path}/{META_FILE}").type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(f"{path}/{META_FILE}") as handle:
        return json.loads(handle.read().decode())


def _write_meta(sweep_dir: str, meta: dict[str, Any]) -> None:
    """Written whole or not at all: one object on object storage, a temporary file renamed on a local disk."""
    fs, path = resolve_storage(sweep_dir)
    fs.create_dir(path, recursive=True)
    data = json.dumps(meta, indent=2, sort_keys=True, default=str).encode()
    target = f"{path}/{META_FILE}"
    if not is_local(sweep_dir):
        with fs.open_output_stream(target) as handle:
            handle.write(data)
        return
    tmp = f"{path}/.{META_FILE}.tmp-{time.time_ns()}"
    with fs.open_output_stream(tmp) as handle:
        handle.write(data)
    fs.move(tmp, target)


def _latest_sweep(storage: str) -> str:
    if not is_local(storage):
        raise ConfigError(f"tracking.storage={storage!r}: --resume on remote storage needs --name")
    metas = sorted(Path(storage).glob(f"*/{META_FILE}"), key=lambda p: p.stat().st_mtime)
    if not metas:
        raise FileNotFoundError(f"--resume: no sweep in {storage} (no */{META_FILE}); pass --storage or --name")
    return metas[-1].parent.name


def optuna_url(config: Config) -> str:
    """Where the Optuna study lives (``tracking.optuna_storage``, see config.py): the URL, or
    ``$SER_OPTUNA_STORAGE``, or an SQLite file in the run storage; when that storage is remote, in the driver's
    cache folder (never the job's working directory, which holds its logs only)."""
    explicit = config.tracking.optuna_storage or os.environ.get("SER_OPTUNA_STORAGE", "")
    if explicit.strip():
        return explicit.strip()
    storage = config.tracking.storage or DEFAULT_STORAGE
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ser_platform"
    root = Path(absolute_location(storage)) if is_local(storage) else cache
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'optuna.db'}"


# --- the driver ----------------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """What a sweep did: its names and places, one entry per Tune trial, the tables built from its MLflow runs."""

    name: str
    experiment: Experiment
    sweep_dir: str
    mlflow_uri: str
    mlflow_experiment_id: str
    parent_run_id: str
    optuna_storage: str
    expected_trials: int = 0
    status: str = "RUNNING"  # the parent run's final MLflow status: FINISHED, FAILED (a trial errored), KILLED
    trials: list[dict[str, Any]] = field(default_factory=list)
    errors: int = 0
    tables: list[Table] = field(default_factory=list)
    wall_seconds: float = 0.0


def _point(params: dict[str, Any]) -> str:
    """A trial's parameters as its console lines show them."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def _progress_callback(total: int, metric: str) -> Any:
    from ray import tune

    class TrialProgress(tune.Callback):
        """A line per finished trial (its objective and test scores, how many are done), printed by the driver;
        the callback is pickled with the Tuner, so it holds no open stream."""

        def __init__(self) -> None:
            self.total = total
            self.done = 0

        def _line(self, trial: Any, status: str) -> None:
            self.done += 1
            result = trial.last_result or {}
            scores = ", ".join(f"{name} {result[key]:.3f} ± {result.get(key.replace('_mean', '_std'), 0.0):.3f}"
                               for name, key in ((metric, metric), ("test UA", "test_ua_mean"))
                               if isinstance(result.get(key), (int, float)))
            print(f"trial {self.done}/{self.total} {status}: {trial.trial_id} ({_point(trial.config or {})})"
                  + (f": {scores}" if scores else ""), flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trial, "done")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trial, "FAILED")

    return TrialProgress()


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _build_tuner(ctx: TrialContext, config: Config, sweep_dir: str, study_storage: str, resume: bool, verbose: bool,
                 fold_data: Any = None) -> Any:
    from ray import tune

    def sweep_trial(params: dict[str, Any], fold_data: Any = None) -> None:
        run_trial(params, ctx, fold_data)

    experiment = ctx.experiment
    # The splits travel through Ray's object store (with_parameters), not pickled into the trainable; a trial
    # sits on the head and holds no CPU (resources.TRIAL_RESOURCES).
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, fold_data=fold_data), TRIAL_RESOURCES)
    if resume and tune.Tuner.can_restore(sweep_dir):
        return tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    if experiment.is_search:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=config.sweep.seed), study_name=ctx.sweep_name,
                                  storage=optuna.storages.RDBStorage(study_storage))
        search_alg = _staggered(search_alg, config.sweep.max_concurrent, config.sweep.start_interval_s)
        param_space, num_samples, total = search_space(experiment), config.sweep.trials, config.sweep.trials
    else:
        search_alg = None  # Tune's BasicVariantGenerator: every grid point once
        param_space, num_samples, total = {"variant": tune.grid_search(list(experiment.variants))}, 1, len(
            experiment.rows)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=config.sweep.metric, mode=config.sweep.mode, search_alg=search_alg,
                                    num_samples=num_samples,
                                    # the search's limit is its searcher's (_staggered); Tune's would wrap it again
                                    max_concurrent_trials=None if search_alg else config.sweep.max_concurrent,
                                    trial_dirname_creator=_trial_dirname),
        # Tune's own status tables only with --verbose: the callback prints a line per trial.
        run_config=tune.RunConfig(name=ctx.sweep_name, storage_path=config.tracking.storage, verbose=int(verbose),
                                  failure_config=tune.FailureConfig(max_failures=config.sweep.max_failures),
                                  callbacks=[_progress_callback(total, config.sweep.metric)]),
    )


def _staggered(searcher: Any, max_concurrent: int, interval_s: float) -> Any:
    """``searcher`` limited to ``max_concurrent`` live trials (Tune's ConcurrencyLimiter), and no new trial within
    ``interval_s`` of the previous one's start (sweep.start_interval_s): Tune asks again, the searcher says "not
    yet" as the limiter does when full. The last start is wall-clock time, saved with Tune's state, so a resumed
    sweep does not wait for a clock of the process that died."""
    from ray.tune.search import ConcurrencyLimiter, Searcher

    class Staggered(ConcurrencyLimiter):
        def __init__(self) -> None:
            super().__init__(searcher, max_concurrent=max_concurrent)
            self.interval_s, self.last_start = interval_s, 0.0

        def suggest(self, trial_id: str) -> dict | None:
            if time.time() - self.last_start < self.interval_s:
                return None
            suggestion = super().suggest(trial_id)
            if suggestion not in (None, Searcher.FINISHED):
                self.last_start = time.time()
            return suggestion

    return Staggered()


def log_optuna_plots(run: tracking.MlflowRun, study_name: str, study_storage: str) -> list[str]:
    """Optuna's own plots of the study (optimisation history, parameter importances, alpha/beta contour) as figures
    on the parent run; a plot the study cannot support yet (too few finished trials) is skipped, saying why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    study = optuna.load_study(study_name=study_name, storage=study_storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plots = {
        "optuna/optimization_history.png": (1, lambda: ovm.plot_optimization_history(study)),
        "optuna/param_importances.png": (2, lambda: ovm.plot_param_importances(study)),
        "optuna/contour_alpha_beta.png": (2, lambda: ovm.plot_contour(study, params=["loss.alpha", "loss.beta"])),
    }
    logged = []
    for path, (needed, plot) in plots.items():
        if len(complete) < needed:
            print(f"optuna plot {path} skipped: needs {needed} finished trials, the study has {len(complete)}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = plot()
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                print(f"optuna plot {path} skipped: {err}")
                plt.close("all")
                continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = first.get_figure()
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        run.log_figure(figure, path)
        logged.append(path)
    return logged


def _ui_hint(uri: str, experiment_id: str, parent_run_id: str) -> str:
    shown = uri
    db = sqlite_path(uri)
    if db is not None and db.parent == Path.cwd():
        shown = f"sqlite:///{db.name}"
    if is_server(uri):
        base = uri.rstrip("/")
        return (f"MLflow: {base}/#/experiments/{experiment_id}/runs  "
                f"(this sweep: {base}/#/experiments/{experiment_id}/runs/{parent_run_id})")
    return (f"MLflow: mlflow ui --backend-store-uri {shown}\n"
            f"        then open http://127.0.0.1:5000/#/experiments/{experiment_id}/runs  "
            f"(this sweep's parent run: #/experiments/{experiment_id}/runs/{parent_run_id})")


def _check_experiment(config: Config, experiment: Experiment) -> None:
    """Before anything starts: every row's overrides apply (the config checked sweep.metric)."""
    if config.sweep.metric.startswith("test_"):
        warnings.warn(f"sweep.metric={config.sweep.metric!r} selects on the test sessions: the sweep's best "
                      f"configuration is then not an unbiased estimate; val_ua_mean is the default for that reason")
    for row in experiment.rows:  # a bad pair fails here, not in a trial
        try:
            config.replace(row.overrides)
        except ConfigError as err:
            raise ConfigError(f"variant {row.label!r} of {experiment.key}: {err}") from None


def _start_or_resume(config: Config, experiment: Experiment | None, name: str | None,
                     resume: bool) -> tuple[Config, Experiment, str, dict[str, Any]]:
    """(config, experiment, name, stored meta) of a new sweep (its locations resolved), or of the one ``--resume``
    continues (the configuration it stored, resolved when it started)."""
    storage = absolute_location(config.tracking.storage or DEFAULT_STORAGE)
    if resume:
        name = name or _latest_sweep(storage)
        meta = _read_meta(join_storage(storage, name))
        if meta is None:
            raise FileNotFoundError(f"--resume: no sweep named {name!r} in {storage} (no {META_FILE})")
        # The sweep continues with the configuration and the experiment it started with.
        return from_dict(meta["config"]), catalogue_entry(meta["experiment"]), name, meta
    experiment = experiment or default_experiment(config)
    name = name or f"{experiment.key}-{time.strftime('%Y%m%d-%H%M%S')}"
    if _read_meta(join_storage(storage, name)) is not None:
        raise FileExistsError(f"sweep {name!r} already exists in {storage}: pass --resume to continue it, "
                              f"or choose another --name")
    _check_experiment(config, experiment)
    return config, experiment, name, {}


def _open_parent(config: Config, experiment: Experiment, name: str, meta: dict[str, Any],
                 sweep_dir: str) -> tuple[tracking.MlflowRun, str, str]:
    """The sweep's parent run (created, or the stored one set RUNNING again), its MLflow experiment id and the
    Optuna storage; the sweep's meta written to its storage."""
    uri = tracking.ensure_store(config.tracking.mlflow_uri)
    experiment_id = meta.get("mlflow_experiment_id") or tracking.experiment_id(uri, config.tracking.experiment)
    optuna_storage = meta.get("optuna_storage") or optuna_url(config)
    if meta.get("parent_run_id"):
        parent = tracking.MlflowRun(uri, meta["parent_run_id"])
        parent.set_status("RUNNING")
    else:
        parent = tracking.open_sweep_run(uri, experiment_id, name, kind=experiment.key, table=experiment.table,
                                         variants=list(experiment.variants), varied=experiment.varied_keys,
                                         config=config)
    _write_meta(sweep_dir, {"name": name, "experiment": experiment.key, "config": config.to_dict(),
                            "mlflow_uri": uri, "mlflow_experiment_id": experiment_id,
                            "parent_run_id": parent.run_id, "optuna_storage": optuna_storage, "study_name": name,
                            "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return parent, experiment_id, optuna_storage


def run_sweep(config: Config, experiment: Experiment | None = None, *, name: str | None = None,
              resume: bool = False, ray_address: str | None = None,
              train_fn: Callable[..., Any] | None = None, verbose: bool = True,
              console: Console | None = None) -> SweepResult:
    """Run (or, with ``resume``, continue) a sweep of ``experiment`` (default: :func:`default_experiment`); log
    it to MLflow; return its trials and tables. ``train_fn`` replaces ``ray_train.train_folds`` (same
    signature), e.g. for tests of the sweep machinery. ``verbose``: print the tables and where to look at the
    end; ``console``: what shows while it runs (default: the project's lines, not Ray's).

    Order: a bad dataset or an unreachable tracking server fails first; then Ray, and with the cluster known
    (``cluster.prepare_run``) local paths are refused on several nodes before anything is written, and the
    trials and units at once are decided and printed; the splits are read once for every trial."""
    import ray

    from ser_platform.ray_train import FoldData, init_ray

    started = time.perf_counter()
    console = console or Console()
    console.quiet_libraries()
    config, experiment, name, meta = _start_or_resume(config, experiment, name, resume)
    if resume and verbose:
        print(f"resuming sweep {name!r} ({experiment.title}) with its stored configuration")
    check_before_ray(config)
    started_ray = not ray.is_initialized()
    # A Ray started here is this one machine, where the local store is right (prepare_run refuses local paths
    # only on several nodes): a new SQLite store's schema is created while Ray starts (seconds, both).
    local = started_ray and not (ray_address or os.environ.get("RAY_ADDRESS"))
    store_ready = tracking.ensure_store_started(tracking.resolve_tracking_uri(config)) if local else None
    console.open(init_ray(ray_address, console) if started_ray else None)
    status, result, parent = "FAILED", None, None
    try:
        expected = config.sweep.trials if experiment.is_search else len(experiment.rows)
        config = prepare_run(config, sweep=True, trials=expected, say=console.say)
        if store_ready is not None:
            store_ready()
        sweep_dir = join_storage(config.tracking.storage, name)
        parent, experiment_id, optuna_storage = _open_parent(config, experiment, name, meta, sweep_dir)
        result = SweepResult(name=name, experiment=experiment, sweep_dir=sweep_dir,
                             mlflow_uri=config.tracking.mlflow_uri, mlflow_experiment_id=experiment_id,
                             parent_run_id=parent.run_id, optuna_storage=optuna_storage,
                             expected_trials=expected)
        ctx = TrialContext(base_config=config.to_dict(), experiment=experiment, sweep_name=name,
                           mlflow_uri=config.tracking.mlflow_uri, mlflow_experiment_id=experiment_id,
                           parent_run_id=parent.run_id, train_storage=join_storage(sweep_dir, "train"),
                           train_fn=train_fn, progress=console.channel)
        fold_data = None if train_fn else FoldData.prepare(config, config.data.dataset)
        tuner = _build_tuner(ctx, config, sweep_dir, optuna_storage, resume, console.verbose, fold_data)
        for trial in tuner.fit():
            metrics = dict(trial.metrics or {})
            result.trials.append({"trial_id": metrics.get("trial_id"), "config": dict(trial.config or {}),
                                  "metrics": metrics, "error": None if trial.error is None else str(trial.error)})
        result.errors = sum(t["error"] is not None for t in result.trials)
        status = "FAILED" if result.errors else "FINISHED"
    finally:
        console.close()
        if started_ray:
            ray.shutdown()
        if result is not None:
            result.wall_seconds = time.perf_counter() - started
            _finish(parent, result, config, status, verbose)
    return result


def _finish(parent: tracking.MlflowRun, result: SweepResult, config: Config, status: str, verbose: bool) -> None:
    """Tables and plots on the parent run, its summary metrics and status; print where to look."""
    uri, experiment_id = result.mlflow_uri, result.mlflow_experiment_id
    sweeps = tracking.collect_sweeps(uri, experiment_id, parent.run_id)
    running = [t for t in (sweeps[0].trials if sweeps else ()) if t.status == "RUNNING"]
    for trial in running:  # Tune is done with it: an attempt killed before Tune saved its state
        tracking.MlflowRun(uri, trial.run_id).set_status("KILLED")
    if running:
        sweeps = tracking.collect_sweeps(uri, experiment_id, parent.run_id)
    result.tables = sweep_tables(sweeps[0], uri) if sweeps else []
    log_tables(parent, result.tables)
    plots = log_optuna_plots(parent, result.name, result.optuna_storage) if result.experiment.is_search else []
    complete = [t for t in (sweeps[0].trials if sweeps else ()) if t.complete]
    if status == "FINISHED" and len(complete) < result.expected_trials:
        status = "KILLED"  # interrupted (Ctrl+C): --resume continues it
    best = None
    if complete:
        metric, pick = config.sweep.metric, max if config.sweep.mode == "max" else min
        chosen = pick(complete, key=lambda t: t.metrics.get(metric, -math.inf if pick is max else math.inf))
        best = (chosen.run_id, chosen.metrics)
    tracking.finish_sweep_run(parent, status=status, trials_complete=len(complete), trials_errored=result.errors,
                              wall_seconds=result.wall_seconds, best=best)
    result.status = status
    if verbose:
        _print_summary(result, config, complete, plots)


def _print_summary(result: SweepResult, config: Config, complete: list, plots: list[str]) -> None:
    print()
    print(f"Sweep {result.name!r}: {result.experiment.title}; {len(complete)} of {result.expected_trials} "
          f"trial(s) complete, {result.errors} errored; {result.wall_seconds:.0f} s")
    for table in result.tables:
        print()
        print(format_table(table))
    print()
    print(_ui_hint(result.mlflow_uri, result.mlflow_experiment_id, result.parent_run_id))
    print(f"Tables: artifacts tables/*.md and tables/*.json of the parent run; again any time with "
          f"`ser tables --mlflow-experiment {config.tracking.experiment} --mlflow-uri {result.mlflow_uri}`")
    if plots:
        print(f"Optuna: {', '.join(plots)} on the parent run; the study: optuna.load_study("
              f"study_name={result.name!r}, storage={result.optuna_storage!r})")
    print(f"Tune state: {result.sweep_dir}  (continue an interrupted sweep with --resume --name {result.name})")


def ui_location(result: SweepResult) -> str:
    """Where a sweep's table is in the MLflow UI: its parent run, and the filter that lists its trials."""
    table = result.experiment.table
    base = (result.mlflow_uri.rstrip("/") if is_server(result.mlflow_uri) else "http://127.0.0.1:5000")
    return (f"{base}/#/experiments/{result.mlflow_experiment_id}/runs/{result.parent_run_id} (artifacts tables/); "
            f"its trials: filter params.table = \"{table}\" on the experiment's runs")


def run_group(configs: list[tuple[Experiment, Config]], *, name: str | None = None, resume: bool = False,
              ray_address: str | None = None, verbose: bool = False) -> list[SweepResult]:
    """Several experiments in turn on one Ray instance, each its own sweep ``NAME-<key>`` under its own parent
    run (``ser sweep --experiment tables``: Tables 1-3); ``resume`` continues each one that exists."""
    import ray

    from ser_platform.ray_train import init_ray

    name = name or f"tables-{time.strftime('%Y%m%d-%H%M%S')}"
    console = Console(verbose)
    logs = init_ray(ray_address, console)
    results = []
    try:
        for position, (experiment, config) in enumerate(configs, start=1):
            console.say(f"[{position}/{len(configs)}] {experiment.title}")
            sub = f"{name}-{experiment.key}"
            exists = resume and _read_meta(join_storage(absolute_location(config.tracking.storage
                                                                           or DEFAULT_STORAGE), sub)) is not None
            results.append(run_sweep(config, experiment, name=sub, resume=exists, console=Console(verbose)))
    finally:
        if logs is not None:
            ray.shutdown()
    console.say("")
    for result in results:
        console.say(f"Table {result.experiment.table} ({result.name}, {result.status}): {ui_location(result)}")
    if results and not is_server(results[0].mlflow_uri):
        console.say(f"(open the UI first: mlflow ui --backend-store-uri {results[0].mlflow_uri})")
    if logs:
        console.say(f"Ray's own output of this run: {logs}")
    return results


def sweep_command(config: Config, experiment: Experiment | None = None, *, name: str | None = None,
                  resume: bool = False, ray_address: str | None = None, verbose: bool = False) -> int:
    """``ser sweep`` and the experiment scripts: run the sweep, print the tables; exit status 1 unless every trial
    completed (one errored, or the sweep was interrupted: ``--resume`` continues it). ``verbose``: Ray's and
    Tune's own output too."""
    result = run_sweep(config, experiment, name=name, resume=resume, ray_address=ray_address,
                       console=Console(verbose))
    return 0 if result.status == "FINISHED" else 1
