"""MLflow: where runs go, a store that exists before anyone writes to it, and small loggers for runs.

Layout of what one ``ser train`` records (``ser sweep`` adds one level above):

    run per invocation (params: the flattened config, git commit, dataset fingerprint; artifact config.yaml;
    │                   metrics: mean and std over folds)
    └── run per fold   (same params + fold; metrics per epoch: loss terms, validation WA/UA, epoch time;
                        final: test WA/UA overall and on the improvised/scripted subsets; confusion matrix as
                        JSON and as a figure)

Runs are written through ``MlflowClient`` with explicit run ids rather than mlflow's fluent "active run": the
fold runs are created inside Ray Train workers (rank 0 only), where a process-global active run would be
shared between threads and restarts. A run is named by a small picklable :class:`MlflowRun` (URI + run id) so
its id can travel in a checkpoint and a restarted worker keeps logging to the same run.

Tracking URI precedence: ``config.tracking.mlflow_uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db``
(what ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` opens). SQLite paths are made absolute, because Ray
workers run in other working directories. FACTS: sixteen processes creating a fresh SQLite store at once all
failed, so :func:`ensure_store` creates it once in the driver before any worker or trial starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from ser_platform.config import Config

DEFAULT_DB_NAME = "mlflow.db"
PARENT_RUN_TAG = "mlflow.parentRunId"  # how MLflow (and its UI) nests runs
ROLE_TAG = "ser.role"  # "train" (a `ser train` invocation), "fold"; the sweep adds "sweep" and "trial"
TRAIN_RUN_TAG = "ser.train_run"  # the Ray Train run name: how a restarted run finds its MLflow runs again
FOLD_TAG = "ser.fold"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


class TrackingError(ValueError):
    """The tracking store cannot be used; the message names the URI and what to do."""


# --- where runs go -----------------------------------------------------------------------------------------

def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///mlflow.db`` (relative to the cwd) -> ``sqlite:////abs/cwd/mlflow.db``; other URIs unchanged."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = uri[len(prefix):]
    if path.startswith("/") or path == ":memory:":
        return uri
    return prefix + str(Path(path).resolve())


def resolve_tracking_uri(config: Config | None = None, cli_value: str | None = None) -> str:
    """The tracking URI: ``cli_value`` / ``config.tracking.mlflow_uri`` > ``$MLFLOW_TRACKING_URI`` > local SQLite.

    The precedence is ``ser_platform.cluster.mlflow_tracking_uri``'s (default ``sqlite:///<absolute
    cwd>/mlflow.db``); relative SQLite paths are then made absolute so that Ray workers (other working
    directories) write to the same file as the driver.
    """
    from ser_platform.cluster import mlflow_tracking_uri

    explicit = cli_value or (config.tracking.mlflow_uri if config is not None else "")
    return _absolute_sqlite(mlflow_tracking_uri(explicit or None))


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return None if path == ":memory:" else Path(path)


@contextlib.contextmanager
def _http_limits(timeout_s: float) -> Iterator[None]:
    """No retries and a short timeout for one probe (mlflow reads these env vars at request time)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(round(timeout_s))))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_store(uri: str, *, timeout_s: float = 10.0) -> str:
    """Make the tracking store usable before training: create a SQLite store once, or probe a server.

    Call it in the driver before workers or trials start. A SQLite store's schema is created here (one
    process, no race); a server is asked for one experiment with no retries and a ``timeout_s`` timeout, so
    an unreachable server fails the command at start with a clear message instead of after hours of training.
    Returns ``uri``.
    """
    from mlflow import MlflowClient

    from ser_platform.cluster import check_tracking_server

    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        check_tracking_server(uri, timeout=timeout_s)  # http(s): GET /health, no retries
    except RuntimeError as err:
        raise TrackingError(str(err)) from err
    try:
        with _http_limits(timeout_s):
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # mlflow raises MlflowException, requests' errors or sqlalchemy's: report them all
        hint = ("is `mlflow server` running there and reachable from this machine?"
                if uri.startswith(("http://", "https://")) else "is the path writable?")
        raise TrackingError(f"MLflow tracking store {uri!r} cannot be used ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); {hint}") from err
    return uri


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if absent (concurrent creators tolerated).

    On a SQLite store the artifacts go beside the database (``<db dir>/mlruns/<id>``), an absolute path, so
    every process writes them to one place whatever its working directory.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = _sqlite_path(uri)
    location = (db.parent / "mlruns").resolve().as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it in between
        if found is None:
            raise
        return found.experiment_id


# --- what identifies a run's inputs -----------------------------------------------------------------------

def git_commit(repo_dir: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the package's checkout, ``-dirty`` appended if tracked files changed. Outside a
    git checkout (an installed wheel, or a ``ray job submit --working-dir .`` upload, which leaves ``.git`` out):
    ``$SER_GIT_COMMIT`` if set (cluster/README.md passes it with the job), else ``"unknown"``."""
    where = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SER_GIT_COMMIT") or "unknown"
    return commit + ("-dirty" if dirty else "")


def dataset_fingerprint(dataset: str, summary: Mapping[str, Any] | None = None) -> str:
    """A short hash naming a Parquet dataset's contents: its files' relative names and sizes, plus its summary.

    Works on local paths and on ``s3://`` / ``gs://`` (pyarrow filesystems). Cheap: no file is read. Two
    datasets with the same files, sizes and summary get the same fingerprint.
    """
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(dataset)
    except (pafs.ArrowInvalid, ValueError):
        fs, root = pafs.LocalFileSystem(), str(Path(dataset).resolve())
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{dataset}: no such Parquet dataset")
    if info.type == pafs.FileType.File:
        entries = [(Path(root).name, info.size)]
    else:
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        entries = sorted((f.path[len(root):].lstrip("/"), f.size) for f in found if f.type == pafs.FileType.File)
    digest = hashlib.sha256()
    for name, size in entries:
        digest.update(f"{name}\t{size}\n".encode())
    digest.update(json.dumps(summary or {}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def config_params(config: Config, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The whole flattened config (dotted keys) plus ``extra``, as MLflow param strings (tuples as ``1,2,3``)."""
    params: dict[str, str] = {}
    for key, value in {**config.flat(), **(extra or {})}.items():
        text = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
        params[key] = text[:MAX_PARAM_CHARS]
    return params


# --- a run ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MlflowRun:
    """One MLflow run named by its URI and id: picklable, so it can travel to a worker or into a checkpoint."""

    tracking_uri: str
    run_id: str

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self.client.log_figure(self.run_id, figure, artifact_file)
        finally:
            plt.close(figure)

    def log_config(self, config: Config, extra_params: Mapping[str, Any] | None = None) -> None:
        """The flattened config (+ ``extra_params``) as params and the resolved config as ``config.yaml``."""
        self.log_params(config_params(config, extra_params))
        # JSON round trip: tuples (data.folds) become lists, which safe_dump can write and from_dict reads back.
        self.log_text(yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False), "config.yaml")

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED`` / ``FAILED`` / ``KILLED``."""
        self.client.set_terminated(self.run_id, status=status)


def start_run(tracking_uri: str, experiment: str, *, run_name: str, parent_run_id: str | None = None,
              tags: Mapping[str, Any] | None = None) -> MlflowRun:
    """Create a run in experiment ``experiment`` (name or id), nested under ``parent_run_id`` when given."""
    from mlflow import MlflowClient

    exp_id = experiment if experiment.isdigit() else experiment_id(tracking_uri, experiment)
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    run = MlflowClient(tracking_uri).create_run(exp_id, tags=all_tags, run_name=run_name)
    return MlflowRun(tracking_uri, run.info.run_id)


def find_or_start_run(tracking_uri: str, experiment: str, *, run_name: str, tags: Mapping[str, Any],
                      parent_run_id: str | None = None) -> MlflowRun:
    """The run of experiment ``experiment`` whose tags include all of ``tags`` (and whose parent is
    ``parent_run_id``), else a new one: running the same thing again continues its run instead of adding one."""
    from mlflow import MlflowClient

    exp_id = experiment if experiment.isdigit() else experiment_id(tracking_uri, experiment)
    wanted = {k: str(v) for k, v in tags.items()}
    if parent_run_id:
        wanted[PARENT_RUN_TAG] = parent_run_id
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in wanted.items() if "'" not in v)
    for run in MlflowClient(tracking_uri).search_runs([exp_id], filter_string=query, max_results=50):
        if all(run.data.tags.get(k) == v for k, v in wanted.items()) and (
                parent_run_id or PARENT_RUN_TAG not in run.data.tags):
            return MlflowRun(tracking_uri, run.info.run_id)
    return start_run(tracking_uri, exp_id, run_name=run_name, parent_run_id=parent_run_id, tags=tags)


def log_confusion(run: MlflowRun, confusion: Sequence[Sequence[int]], class_names: Sequence[str],
                  name: str = "confusion_test") -> None:
    """The confusion matrix (rows = true class, columns = predicted) as ``<name>.json`` and ``<name>.png``."""
    from ser_platform.metrics import confusion_figure

    matrix = [[int(v) for v in row] for row in confusion]
    run.log_dict({"classes": list(class_names), "matrix": matrix}, f"{name}.json")
    run.log_figure(confusion_figure(matrix, class_names), f"{name}.png")


# --- the selected model of a fold run (what `ser predict` loads) --------------------------------------------

MODEL_ARTIFACT_DIR = "model"
MODEL_WEIGHTS_FILE = "state_dict.pt"  # torch.save of the plain model's state dict (CPU tensors)
MODEL_CONFIG_FILE = "config.json"  # the resolved config, Config.to_dict()
MODEL_INFO_FILE = "info.json"  # fold, selected epoch, validation scores, classes, which weights were left out
MODEL_FORMAT_VERSION = 1


def frozen_encoder_keys(state_dict: Mapping[str, Any], config: Config) -> list[str]:
    """Keys of the frozen encoders' own weights (``model.encoders="frozen"``): a pretrained checkpoint or a
    "tiny" encoder drawn from its ``tiny_seed``, so rebuilt exactly from the config and not worth storing."""
    if config.model.encoders != "frozen":
        return []
    prefixes = ("text_encoder.encoder.", "speech_encoder.ssl.encoder.")
    return [k for k in state_dict if k.startswith(prefixes)]


def log_model(run: MlflowRun, state_dict: Mapping[str, Any], config: Config,
              info: Mapping[str, Any] | None = None) -> int:
    """Log a fold's selected (best-validation) weights and its resolved config as artifacts ``model/`` of the
    fold run: ``state_dict.pt`` (frozen encoders' weights left out, see :func:`frozen_encoder_keys`),
    ``config.json`` and ``info.json`` (``info`` plus the format version and what was left out).
    Returns the size of ``state_dict.pt`` in bytes."""
    import tempfile

    import torch

    left_out = set(frozen_encoder_keys(state_dict, config))
    weights = {k: v.detach().to("cpu") for k, v in state_dict.items() if k not in left_out}
    with tempfile.TemporaryDirectory(prefix="ser-model-") as tmp:
        folder = Path(tmp) / MODEL_ARTIFACT_DIR
        folder.mkdir()
        torch.save(weights, folder / MODEL_WEIGHTS_FILE)
        (folder / MODEL_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1, default=list))
        size = (folder / MODEL_WEIGHTS_FILE).stat().st_size
        (folder / MODEL_INFO_FILE).write_text(json.dumps({
            **dict(info or {}), "format_version": MODEL_FORMAT_VERSION, "weights_bytes": size,
            "frozen_encoders_left_out": bool(left_out)}, indent=1, default=str))
        run.client.log_artifacts(run.run_id, str(folder), MODEL_ARTIFACT_DIR)
    return size
