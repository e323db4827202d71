"""Ray Tune sweeps over the loss and the model's parts (the paper's Tables 1-3): one trial = one configuration
trained and scored on every fold of the protocol.

* ``search`` (``sweep_loss_weights.py``, ``ser sweep``): Optuna TPE (seeded) over the dotted config keys
  ``loss.alpha``, ``loss.beta``, ``loss.margin`` and ``loss.space`` (where the metric loss sits).
* ``grid`` (``--grid paper``): exactly Table 2's (alpha, beta) points, through Tune's grid search.
* ``ablation`` (Table 1), ``embedding_space`` (Table 3) and ``compare_models`` (Table 4's baselines): a grid over
  named variants.

Each trial calls ``train_folds`` (Ray Train, every fold of ``config.data.folds``) and reports once, with the mean
and std over folds. The objective is ``config.sweep.metric``, by default ``val_ua_mean``: UA, as the issue asks,
but measured on the validation speakers of the training sessions, so the search never sees a test session; test
WA/UA are logged beside it and are what the tables show.

MLflow: a parent run per sweep, a child run per trial (params ``table``, ``variant``, every dotted config key;
metrics the fold summary), a grandchild run per fold (made by ``train_folds``). The sweep's parent run id, its
configuration and where its Optuna study lives are kept in ``<storage>/<name>/ser_sweep.json``, so ``--resume``
continues the same sweep under the same parent run: Tune restores its experiment state, finished trials are kept,
unfinished ones run again under their own trial id and MLflow run. Tune restarts such a trial function from its
start; ``train_folds`` is then called with the same Train run name (``trial=<id>``) and storage, so Ray Train
continues from the last epoch checkpoint and the fold runs are found again by their tags, not duplicated.

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
from typing import Any, Callable, Mapping

import numpy as np

from ser_platform.cluster import TRIAL_CPU
from ser_platform.config import EMBEDDING_SPACES, Config, ConfigError, from_dict
from ser_platform.tables import (KIND_TAG, PARENT_TAG, ROLE_TAG, SEARCH_VARIANT, SWEEP_TAG,
                                 TRIAL_ID_TAG, Table, collect_sweeps, format_table, log_tables, sweep_tables)

META_FILE = "ser_sweep.json"
DEFAULT_STORAGE = "runs"
# What a trial reports (the objective must be one of these); test_* would let the search see the test sessions.
REPORTED_METRICS = ("val_ua_mean", "val_ua_std", "val_wa_mean", "val_wa_std", "test_wa_mean", "test_wa_std",
                    "test_ua_mean", "test_ua_std")


@dataclass(frozen=True)
class Experiment:
    """What a sweep varies: an Optuna search (``variants is None``) or a grid over named variants, each a set of
    dotted config overrides, and which of the paper's tables its trials fill. ``defaults`` are overrides an
    experiment script applies to the preset before the user's own (``--set`` wins); ``demo_defaults`` likewise,
    with the demo preset only (the embedded default's sizes and epochs; the paper preset keeps its own)."""

    key: str
    table: str
    title: str
    variants: Mapping[str, Mapping[str, Any]] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    demo_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_search(self) -> bool:
        return self.variants is None


SEARCH = Experiment("search", "2", "Optuna TPE over alpha, beta, the triplet margin and the metric-loss space")
PAPER_GRID = Experiment("grid", "2", "Table 2: the paper's (alpha, beta) points", variants={
    "alpha=0 beta=1": {"loss.alpha": 0.0, "loss.beta": 1.0},
    "alpha=0.5 beta=1": {"loss.alpha": 0.5, "loss.beta": 1.0},
    "alpha=1 beta=0.5": {"loss.alpha": 1.0, "loss.beta": 0.5},
    "alpha=1 beta=1": {"loss.alpha": 1.0, "loss.beta": 1.0},
})
# The paper's Table 1 "Full model" scores (.774/.777) are its Table 3 "Speech Embedding" row: its full model puts
# the metric loss on the speech embedding, so the ablation starts from there (alpha 0.5, beta 1 as in Table 2).
ABLATION = Experiment("ablation", "1", "Table 1: ablation", variants={
    "Full model": {},
    "without FA": {"model.focus_attention": False},
    "without metric loss": {"loss.alpha": 0.0},
}, defaults={"loss.space": "speech"})
EMBEDDING_SPACE = Experiment("embedding_space", "3", "Table 3: embedding space of the metric loss", variants={
    space: {"loss.space": space} for space in EMBEDDING_SPACES
})
# The embedded default of Table 4 trains to convergence, which a baseline comparison needs and the demo's 5
# epochs do not give (there the full model, slower to start, was level with speech alone): 20 epochs of 16-d
# encoders and 1.5 s of audio. Measured (plain loop, demo corpus): BENCHMARKS.md, "Table 4's embedded default".
COMPARE_MODELS_DEMO = {
    "model.embed_dim": 16, "model.num_heads": 2, "model.num_layers": 1, "model.embedding_dim": 16,
    "model.speech.tiny_hidden_size": 16, "model.speech.tiny_num_layers": 1, "model.speech.tiny_num_heads": 2,
    "model.speech.tiny_conv_dim": 8, "model.speech.cnn_channels": 8, "model.speech.lstm_hidden": 8,
    "model.text.tiny_hidden_size": 16, "model.text.tiny_num_layers": 1, "model.text.tiny_num_heads": 2,
    "train.batch_size": 16, "train.samples_per_class": 4, "train.epochs": 20, "data.max_audio_seconds": 1.5,
}
# Table 4's runnable rows: each modality alone, early fusion, crossmodal without and with focus attention. The
# metric loss sits on F(x) for all five (the one embedding every variant has), so only the fusion differs.
COMPARE_MODELS = Experiment("compare_models", "4", "Table 4: baselines (one modality, early fusion, crossmodal)",
                            variants={
    "Speech only": {"model.fusion": "speech_only"},
    "Text only": {"model.fusion": "text_only"},
    "Early fusion": {"model.fusion": "early"},
    "Crossmodal without FA": {"model.focus_attention": False},
    "Full model": {},
}, defaults={"loss.space": "fused"}, demo_defaults=COMPARE_MODELS_DEMO)
EXPERIMENTS = {e.key: e for e in (SEARCH, PAPER_GRID, ABLATION, EMBEDDING_SPACE, COMPARE_MODELS)}


def search_space() -> dict[str, Any]:
    """The Optuna search space, keyed by dotted config keys (Tune hands them to the trial as overrides).

    alpha spans the paper's 0 (CE only) to 1; beta stays > 0 so the classifier is always trained; the margin M of
    eq. (7)-(8) is on squared distances of unnormalised embeddings, so its scale is searched on a log axis."""
    from ray import tune

    return {
        "loss.alpha": tune.uniform(0.0, 1.0),
        "loss.beta": tune.uniform(0.25, 1.0),
        "loss.margin": tune.loguniform(0.05, 2.0),
        "loss.space": tune.choice(list(EMBEDDING_SPACES)),
    }


def trial_overrides(experiment: Experiment, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(variant name, dotted overrides) of one trial from the parameters Tune gave it."""
    if experiment.is_search:
        return SEARCH_VARIANT, {key: params[key] for key in search_space()}
    variant = params["variant"]
    if variant not in experiment.variants:
        raise ConfigError(f"variant={variant!r}: expected one of {sorted(experiment.variants)}")
    return variant, dict(experiment.variants[variant])


# --- what one trial logs ------------------------------------------------------------------------------------

def trial_params(config: Config, experiment: Experiment, variant: str, trial_id: str) -> dict[str, str]:
    """Params of a trial run: every dotted config key plus the names the MLflow compare view sorts Tables 1-3 by."""
    from ser_platform.tracking import config_params

    return config_params(config, {
        "table": experiment.table, "variant": variant, "protocol": config.data.protocol,
        "folds": config.data.folds, "seed": config.train.seed, "seeds": config.train.seeds,
        "sweep.kind": experiment.key, "trial_id": trial_id})


def trial_metrics(result: Any) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """(fold summary, per-fold series) of a ``TrialResult``: the summary of ``train_folds`` (mean and std over folds,
    × seeds) and the number of folds that completed; the series are logged with step = fold number.

    With several seeds (``result.per_seed``) each ``fold_*`` series holds the fold's mean over its seeds (so a
    paired comparison by fold compares seed-averaged scores, the stricter choice, see ``comparison.py``), and
    ``fold_test_wa.seed<S>`` / ``fold_test_ua.seed<S>`` hold every (fold, seed) score."""
    folds = sorted(result.per_fold)
    summary = {key: float(value) for key, value in result.summary.items() if isinstance(value, (int, float))}
    summary["folds_completed"] = float(len(folds))
    per_seed = getattr(result, "per_seed", None) or {0: result.per_fold}

    def fold_means(key: str) -> dict[int, float]:
        return {f: float(np.mean([getattr(runs[f], key) for runs in per_seed.values()])) for f in folds}

    series = {f"fold_{key}": fold_means(key) for key in ("val_ua", "val_wa", "test_wa", "test_ua", "best_epoch")}
    if len(per_seed) > 1:
        for seed, runs in sorted(per_seed.items()):
            for key in ("test_wa", "test_ua"):
                series[f"fold_{key}.seed{seed}"] = {f: float(getattr(runs[f], key)) for f in folds}
    return summary, series


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


def open_trial_run(client: Any, ctx: TrialContext, trial_id: str, config: Config, variant: str) -> Any:
    """The trial's MLflow run (child of the sweep's run): the one a previous attempt of this trial left (a
    restarted trial), else a new one carrying the trial's params (:func:`trial_params`)."""
    from mlflow.entities import Param

    found = client.search_runs(
        [ctx.mlflow_experiment_id],
        filter_string=(f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and tags.`{SWEEP_TAG}` = '{ctx.sweep_name}' "
                       f"and tags.`{ROLE_TAG}` = 'trial'"), max_results=10)
    found = [r for r in found if r.data.tags.get(PARENT_TAG) == ctx.parent_run_id]
    if found:
        return found[0]
    name = f"{variant} [{trial_id}]" if variant != SEARCH_VARIANT else f"trial {trial_id}"
    run = client.create_run(ctx.mlflow_experiment_id, run_name=name, tags={
        PARENT_TAG: ctx.parent_run_id, ROLE_TAG: "trial", SWEEP_TAG: ctx.sweep_name, TRIAL_ID_TAG: trial_id,
        "table": ctx.experiment.table, "variant": variant})
    params = trial_params(config, ctx.experiment, variant, trial_id)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run


def log_trial_result(client: Any, run_id: str, result: Any) -> dict[str, float]:
    """Log a ``TrialResult`` on the trial run (summary at step 0, per-fold series at step = fold), mark it
    FINISHED, return the summary."""
    from mlflow.entities import Metric

    summary, series = trial_metrics(result)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in summary.items()]
    metrics += [Metric(key, value, now, fold) for key, values in series.items() for fold, value in values.items()]
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, "FINISHED")
    return summary


def _logged_summary(run: Any, folds_expected: int) -> dict[str, float] | None:
    """The fold summary of a trial run that already finished (killed after logging, before Tune saved it)."""
    metrics = run.data.metrics
    if run.info.status == "FINISHED" and int(metrics.get("folds_completed", -1)) == folds_expected:
        return {k: float(v) for k, v in metrics.items() if k in REPORTED_METRICS or k == "folds_completed"}
    return None


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: the configuration of ``params`` on every fold, reported once as the mean/std over folds."""
    from mlflow import MlflowClient
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    variant, overrides = trial_overrides(ctx.experiment, params)
    config = from_dict(ctx.base_config).replace(overrides)
    client = MlflowClient(tracking_uri=ctx.mlflow_uri)
    run = open_trial_run(client, ctx, trial_id, config, variant)
    run_id = run.info.run_id
    done = _logged_summary(run, len(config.data.folds))
    if done is not None:
        tune.report({**done, "trial_run_id": run_id})
        return
    if run.info.status != "RUNNING":  # an earlier attempt of this trial failed or was killed: it runs again
        client.update_run(run_id, status="RUNNING")
    if ctx.train_fn is None:
        from ser_platform.ray_train import train_folds as train_fn
    else:
        train_fn = ctx.train_fn
    try:
        result = train_fn(config, run_name=f"trial={trial_id}", storage_path=ctx.train_storage,
                          parent_run_id=run_id, tags={SWEEP_TAG: ctx.sweep_name, TRIAL_ID_TAG: trial_id,
                                                      "table": ctx.experiment.table, "variant": variant})
        summary = log_trial_result(client, run_id, result)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    tune.report({**summary, "trial_run_id": run_id})


# --- the driver -----------------------------------------------------------------------------------------------

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


def _is_uri(path: str) -> bool:
    return "://" in path


def storage_root(config: Config) -> str:
    """Tune's storage: ``config.tracking.storage`` (local folder, s3://, gs://) or ./runs, local paths absolute."""
    storage = config.tracking.storage or DEFAULT_STORAGE
    return storage.rstrip("/") if _is_uri(storage) else str(Path(storage).expanduser().resolve())


def _read_meta(sweep_dir: str) -> dict[str, Any] | None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(sweep_dir)
    info = fs.get_file_info(f"{path}/{META_FILE}")
    if info.type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(f"{path}/{META_FILE}") as handle:
        return json.loads(handle.read().decode())


def _write_meta(sweep_dir: str, meta: dict[str, Any]) -> None:
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    if _is_uri(sweep_dir):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(sweep_dir)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{META_FILE}") as handle:  # one object: written whole or not at all
            handle.write(text.encode())
        return
    folder = Path(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{META_FILE}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, folder / META_FILE)


def _latest_sweep(storage: str) -> str:
    if _is_uri(storage):
        raise ConfigError(f"tracking.storage={storage!r}: --resume on remote storage needs --name")
    metas = sorted(Path(storage).glob(f"*/{META_FILE}"), key=lambda p: p.stat().st_mtime)
    if not metas:
        raise FileNotFoundError(f"--resume: no sweep in {storage} (no */{META_FILE}); pass --storage or --name")
    return metas[-1].parent.name


def _optuna_url(storage: str) -> str:
    # Optuna's RDBStorage needs a local database; with remote Tune storage it stays in ./runs of the driver.
    root = Path(DEFAULT_STORAGE).resolve() if _is_uri(storage) else Path(storage)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'optuna.db'}"


def resolve_config(config: Config) -> Config:
    """Absolute dataset path (the embedded synthetic default when empty), absolute MLflow URI and storage: trials
    and Ray workers run in other working directories (and on other machines)."""
    from ser_platform.tracking import resolve_tracking_uri

    overrides: dict[str, Any] = {}
    dataset = config.data.dataset
    if not dataset:
        from ser_platform.demo import ensure_demo_dataset

        overrides["data.dataset"] = ensure_demo_dataset()
    elif not _is_uri(dataset):
        path = Path(dataset).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"data.dataset={dataset!r}: {path} does not exist (make one with `ser prepare`)")
        overrides["data.dataset"] = str(path)
    overrides["tracking.mlflow_uri"] = resolve_tracking_uri(config)
    overrides["tracking.storage"] = storage_root(config)
    if config.sweep.metric not in REPORTED_METRICS:
        raise ConfigError(f"sweep.metric={config.sweep.metric!r}: expected one of {REPORTED_METRICS}")
    if config.sweep.metric.startswith("test_"):
        warnings.warn(f"sweep.metric={config.sweep.metric!r} selects on the test sessions: the sweep's best "
                      f"configuration is then not an unbiased estimate; val_ua_mean is the default for that reason")
    return config.replace(overrides)


def max_concurrent_trials(config: Config, resources: Mapping[str, float]) -> int:
    """How many trials fit at once: config.sweep.max_concurrent, capped by the cluster's CPUs (and GPUs) per trial.
    Without materialised datasets one CPU stays free for Ray Data's read tasks (FACTS: otherwise they starve)."""
    train = config.train
    spare_cpu = 0.0 if config.data.materialize else 1.0
    if train.cpus_per_worker == 0:  # auto: every trial's workers take their share of the CPUs (worker_cpus)
        cpu_per_trial = TRIAL_CPU + 0.01 * train.num_workers
        fit = config.sweep.max_concurrent if resources.get("CPU", 0.0) - spare_cpu >= cpu_per_trial else 0
    else:
        cpu_per_trial = train.num_workers * train.cpus_per_worker + TRIAL_CPU
        fit = math.floor((resources.get("CPU", 0.0) - spare_cpu) / cpu_per_trial)
    if train.use_gpu:
        fit = min(fit, math.floor(resources.get("GPU", 0.0) / (train.num_workers * train.gpus_per_worker)))
    if fit < 1:
        print(f"note: one trial needs {cpu_per_trial:g} CPU"
              + (f" and {train.num_workers * train.gpus_per_worker:g} GPU" if train.use_gpu else "")
              + f"; the cluster has {dict(resources)}: trials wait for an autoscaler to add nodes")
        return 1
    if fit < config.sweep.max_concurrent:
        print(f"note: sweep.max_concurrent={config.sweep.max_concurrent} lowered to {fit}: that is what fits")
    return max(1, min(config.sweep.max_concurrent, fit))


def open_sweep_run(client: Any, experiment_id: str, name: str, experiment: Experiment, config: Config) -> str:
    """Create the sweep's parent run (params: the base config, the kind of sweep and its variants); its id."""
    from mlflow.entities import Param

    from ser_platform.tracking import config_params

    run = client.create_run(experiment_id, run_name=name, tags={
        ROLE_TAG: "sweep", SWEEP_TAG: name, KIND_TAG: experiment.key, "table": experiment.table})
    params = config_params(config, {"table": experiment.table, "sweep.kind": experiment.key,
                                    "sweep.variants": ";".join(experiment.variants or ()) or "optuna"})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _progress_callback(total: int) -> Any:
    from ray import tune

    class TrialProgress(tune.Callback):
        """A tqdm bar over finished trials (created in setup: the callback is pickled with the Tuner)."""

        def __init__(self) -> None:
            self.total = total
            self.bar = None

        def setup(self, **info: Any) -> None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="trials", unit="trial")

        def _tick(self, trial: Any, status: str) -> None:
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(f"{trial.trial_id} {status}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._tick(trial, "done")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._tick(trial, "error")

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            if self.bar is not None:
                self.bar.close()

        def __getstate__(self) -> dict[str, Any]:
            return {"total": self.total, "bar": None}

    return TrialProgress()


def _build_tuner(ctx: TrialContext, config: Config, experiment: Experiment, sweep_dir: str, storage: str,
                 optuna_url: str, max_concurrent: int, resume: bool) -> Any:
    from ray import tune

    def sweep_trial(params: dict[str, Any]) -> None:
        run_trial(params, ctx)

    trainable = tune.with_resources(sweep_trial, {"cpu": TRIAL_CPU})
    if resume and tune.Tuner.can_restore(sweep_dir):
        return tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    if experiment.is_search:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=config.sweep.seed), study_name=ctx.sweep_name,
                                  storage=optuna.storages.RDBStorage(optuna_url))
        param_space, num_samples = search_space(), config.sweep.trials
    else:
        search_alg = None  # Tune's BasicVariantGenerator: every grid point once
        param_space, num_samples = {"variant": tune.grid_search(list(experiment.variants))}, 1
    total = num_samples if experiment.is_search else len(experiment.variants)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=config.sweep.metric, mode=config.sweep.mode, search_alg=search_alg,
                                    num_samples=num_samples, max_concurrent_trials=max_concurrent,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=ctx.sweep_name, storage_path=storage, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[_progress_callback(total)]),
    )


def log_optuna_plots(client: Any, parent_run_id: str, study_name: str, optuna_url: str) -> list[str]:
    """Optuna's own plots of the study (optimisation history, parameter importances, alpha/beta contour) as figures
    on the parent run; a plot the study cannot support yet (too few finished trials) is skipped, saying why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    study = optuna.load_study(study_name=study_name, storage=optuna_url)
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
                continue
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        figure = first.get_figure()
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        client.log_figure(parent_run_id, figure, path)
        plt.close(figure)
        logged.append(path)
    return logged


def _ui_hint(uri: str, experiment_id: str, parent_run_id: str) -> str:
    shown = uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.parent == Path.cwd():
            shown = f"sqlite:///{db.name}"
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        return (f"MLflow: {base}/#/experiments/{experiment_id}/runs  "
                f"(this sweep: {base}/#/experiments/{experiment_id}/runs/{parent_run_id})")
    return (f"MLflow: mlflow ui --backend-store-uri {shown}\n"
            f"        then open http://127.0.0.1:5000/#/experiments/{experiment_id}/runs  "
            f"(this sweep's parent run: #/experiments/{experiment_id}/runs/{parent_run_id})")


def run_sweep(config: Config, experiment: Experiment | None = None, *, name: str | None = None,
              resume: bool = False, ray_address: str | None = None,
              train_fn: Callable[..., Any] | None = None, verbose: bool = True) -> SweepResult:
    """Run (or, with ``resume``, continue) a sweep; log it to MLflow; return its trials and tables.

    ``experiment`` defaults to the Optuna search, or Table 2's grid when ``config.sweep.grid == "paper"``.
    ``train_fn`` replaces ``ray_train.train_folds`` (same signature), e.g. for tests of the sweep machinery."""
    import ray
    from mlflow import MlflowClient

    from ser_platform.tracking import ensure_store
    from ser_platform.tracking import experiment_id as tracking_experiment_id

    started = time.perf_counter()
    storage = storage_root(config)
    if resume:
        name = name or _latest_sweep(storage)
        meta = _read_meta(f"{storage}/{name}")
        if meta is None:
            raise FileNotFoundError(f"--resume: no sweep named {name!r} in {storage} (no {META_FILE})")
        config = from_dict(meta["config"])  # the sweep continues with the configuration it started with
        experiment = EXPERIMENTS[meta["experiment"]]
        if verbose:
            print(f"resuming sweep {name!r} ({experiment.title}) with its stored configuration")
    else:
        experiment = experiment or (PAPER_GRID if config.sweep.grid == "paper" else SEARCH)
        name = name or f"{experiment.key}-{time.strftime('%Y%m%d-%H%M%S')}"
        if _read_meta(f"{storage}/{name}") is not None:
            raise FileExistsError(f"sweep {name!r} already exists in {storage}: pass --resume to continue it, "
                                  f"or choose another --name")
        config = resolve_config(config)
        for variant, overrides in (experiment.variants or {}).items():  # a bad pair fails here, not in a trial
            try:
                config.replace(overrides)
            except ConfigError as err:
                raise ConfigError(f"variant {variant!r} of {experiment.key}: {err}") from None
        meta = {}
    sweep_dir = f"{storage}/{name}"
    uri = config.tracking.mlflow_uri
    ensure_store(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = meta.get("mlflow_experiment_id") or tracking_experiment_id(uri, config.tracking.experiment)
    optuna_url = meta.get("optuna_storage") or _optuna_url(storage)
    parent_run_id = meta.get("parent_run_id")
    if parent_run_id is None:
        parent_run_id = open_sweep_run(client, experiment_id, name, experiment, config)
    else:
        client.update_run(parent_run_id, status="RUNNING")
    _write_meta(sweep_dir, {"name": name, "experiment": experiment.key, "config": config.to_dict(),
                            "mlflow_uri": uri, "mlflow_experiment_id": experiment_id,
                            "parent_run_id": parent_run_id, "optuna_storage": optuna_url, "study_name": name,
                            "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})

    started_ray = not ray.is_initialized()
    if started_ray:
        from ser_platform.ray_train import init_ray

        init_ray(ray_address)
    result = SweepResult(name=name, experiment=experiment, sweep_dir=sweep_dir, mlflow_uri=uri,
                         mlflow_experiment_id=experiment_id, parent_run_id=parent_run_id, optuna_storage=optuna_url,
                         expected_trials=config.sweep.trials if experiment.is_search else len(experiment.variants))
    status = "FAILED"
    try:
        ctx = TrialContext(base_config=config.to_dict(), experiment=experiment, sweep_name=name, mlflow_uri=uri,
                           mlflow_experiment_id=experiment_id, parent_run_id=parent_run_id,
                           train_storage=f"{sweep_dir}/train", train_fn=train_fn)
        tuner = _build_tuner(ctx, config, experiment, sweep_dir, storage, optuna_url,
                             max_concurrent_trials(config, ray.cluster_resources()), resume)
        grid = tuner.fit()
        for trial in grid:
            metrics = dict(trial.metrics or {})
            result.trials.append({"trial_id": metrics.get("trial_id"), "config": dict(trial.config or {}),
                                  "metrics": metrics, "error": None if trial.error is None else str(trial.error)})
        result.errors = sum(t["error"] is not None for t in result.trials)
        status = "FAILED" if result.errors else "FINISHED"
    finally:
        if started_ray:
            ray.shutdown()
        result.wall_seconds = time.perf_counter() - started
        _finish(client, result, config, status, verbose)
    return result


def _finish(client: Any, result: SweepResult, config: Config, status: str, verbose: bool) -> None:
    """Tables and plots on the parent run, its summary metrics and status; print where to look."""
    from mlflow.entities import Metric

    sweeps = collect_sweeps(client, result.mlflow_experiment_id, result.parent_run_id)
    for trial in (sweeps[0].trials if sweeps else ()):
        if trial.status == "RUNNING":  # Tune is done with it: an attempt killed before Tune saved its state
            client.set_terminated(trial.run_id, "KILLED")
    if any(t.status == "RUNNING" for t in (sweeps[0].trials if sweeps else ())):
        sweeps = collect_sweeps(client, result.mlflow_experiment_id, result.parent_run_id)
    result.tables = sweep_tables(sweeps[0], client) if sweeps else []
    log_tables(client, result.parent_run_id, result.tables)
    plots = []
    if result.experiment.is_search:
        plots = log_optuna_plots(client, result.parent_run_id, result.name, result.optuna_storage)
    complete = [t for t in (sweeps[0].trials if sweeps else ()) if t.complete]
    if status == "FINISHED" and len(complete) < result.expected_trials:
        status = "KILLED"  # interrupted (Ctrl+C): --resume continues it
    now = int(time.time() * 1000)
    metrics = [Metric("trials_complete", float(len(complete)), now, 0),
               Metric("trials_errored", float(result.errors), now, 0),
               Metric("sweep_wall_seconds", result.wall_seconds, now, 0)]
    metric = config.sweep.metric
    if complete:
        pick = max if config.sweep.mode == "max" else min
        best = pick(complete, key=lambda t: t.metrics.get(metric, -math.inf if pick is max else math.inf))
        metrics += [Metric(f"best_{k}", best.metrics[k], now, 0) for k in REPORTED_METRICS if k in best.metrics]
        client.set_tag(result.parent_run_id, "best_trial_run_id", best.run_id)
    client.log_batch(result.parent_run_id, metrics=metrics)
    client.set_terminated(result.parent_run_id, status)
    result.status = status
    if not verbose:
        return
    print()
    print(f"Sweep {result.name!r}: {result.experiment.title}; {len(complete)} of {result.expected_trials} "
          f"trial(s) complete, {result.errors} errored; {result.wall_seconds:.0f} s")
    for table in result.tables:
        print()
        print(format_table(table))
    print()
    print(_ui_hint(result.mlflow_uri, result.mlflow_experiment_id, result.parent_run_id))
    print(f"Tables: artifacts tables/*.md and tables/*.json of the parent run; again any time with "
          f"`ser tables --experiment {config.tracking.experiment} --mlflow-uri {result.mlflow_uri}`")
    if plots:
        print(f"Optuna: {', '.join(plots)} on the parent run; the study: optuna.load_study("
              f"study_name={result.name!r}, storage={result.optuna_storage!r})")
    print(f"Tune state: {result.sweep_dir}  (continue an interrupted sweep with --resume --name {result.name})")


def experiment_command(config: Config, experiment: Experiment, *, name: str | None = None, resume: bool = False,
                       ray_address: str | None = None) -> int:
    """An experiment script's entry point: run the sweep, print the tables; exit status 1 unless every trial
    completed (one errored, or the sweep was interrupted: ``--resume`` continues it)."""
    result = run_sweep(config, experiment, name=name, resume=resume, ray_address=ray_address)
    return 0 if result.status == "FINISHED" else 1


def sweep_command(config: Config, *, name: str | None = None, resume: bool = False,
                  ray_address: str | None = None) -> int:
    """``ser sweep`` and ``experiments/sweep_loss_weights.py``: the Optuna search, or Table 2's grid with
    ``sweep.grid = "paper"``."""
    experiment = PAPER_GRID if config.sweep.grid == "paper" else SEARCH
    return experiment_command(config, experiment, name=name, resume=resume, ray_address=ray_address)
