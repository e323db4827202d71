"""A run: a small picklable handle that logs to one MLflow run, and the one find-or-create.

Runs are written through ``MlflowClient`` with explicit run ids rather than mlflow's fluent "active run": fold runs
are created inside Ray Train workers (rank 0), trial runs inside Tune trials, where a process-global active run
would be shared between threads and restarts. A :class:`MlflowRun` (URI + run id) can travel to a worker or into
a checkpoint, so a restarted worker keeps logging to the same run.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ser_platform.tracking.schema import MAX_PARAM_CHARS, PARENT_RUN_TAG


def config_params(config: Any, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The whole flattened config (dotted keys) plus ``extra``, as MLflow param strings (tuples as ``1,2,3``)."""
    params: dict[str, str] = {}
    for key, value in {**config.flat(), **(extra or {})}.items():
        text = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
        params[key] = text[:MAX_PARAM_CHARS]
    return params


@dataclass(frozen=True)
class MlflowRun:
    """One MLflow run named by its URI and id: picklable, so it can travel to a worker or into a checkpoint."""

    tracking_uri: str
    run_id: str

    @property
    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    # --- reading ---

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def info(self) -> Any:
        """MLflow's ``Run`` (info and data) as stored now."""
        return self.client.get_run(self.run_id)

    # --- writing ---

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_series({step or 0: metrics})

    def log_series(self, by_step: Mapping[int, Mapping[str, float]]) -> None:
        """Metrics at several steps in one request: ``{step: {name: value}}``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for step, values in by_step.items() for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, data: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=dict(data), artifact_file=artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a matplotlib figure and close it."""
        import matplotlib.pyplot as plt

        try:
            self.client.log_figure(self.run_id, figure, artifact_file)
        finally:
            plt.close(figure)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_config(self, config: Any, extra_params: Mapping[str, Any] | None = None) -> None:
        """The flattened config (+ ``extra_params``) as params and the resolved config as ``config.yaml``."""
        import yaml

        from ser_platform.tracking.schema import CONFIG_ARTIFACT

        self.log_params(config_params(config, extra_params))
        # JSON round trip: tuples (data.folds) become lists, which safe_dump can write and from_dict reads back.
        self.log_text(yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False), CONFIG_ARTIFACT)

    def set_status(self, status: str) -> None:
        """``RUNNING`` again (a restarted attempt), or a final ``FINISHED`` / ``FAILED`` / ``KILLED``."""
        if status == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, status=status)

    def finish(self, status: str = "FINISHED") -> None:
        self.set_status(status)

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        """Download an artifact (file or folder) of the run into ``dst``; its local path."""
        import mlflow.artifacts

        return Path(mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst), tracking_uri=self.tracking_uri))

    def artifact_names(self, folder: str = "") -> set[str]:
        return {a.path for a in self.client.list_artifacts(self.run_id, folder or None)}


def start_run(tracking_uri: str, experiment_id: str, *, run_name: str, parent_run_id: str | None = None,
              tags: Mapping[str, Any] | None = None) -> MlflowRun:
    """Create a run in experiment ``experiment_id``, nested under ``parent_run_id`` when given."""
    from mlflow import MlflowClient

    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    run = MlflowClient(tracking_uri).create_run(experiment_id, tags=all_tags, run_name=run_name)
    return MlflowRun(tracking_uri, run.info.run_id)


def find_run(tracking_uri: str, experiment_id: str, *, tags: Mapping[str, Any],
             parent_run_id: str | None = None) -> MlflowRun | None:
    """The oldest run of the experiment whose tags include all of ``tags`` and whose parent is ``parent_run_id``
    (no parent when None), or None."""
    from mlflow import MlflowClient

    wanted = {k: str(v) for k, v in tags.items()}
    if parent_run_id:
        wanted[PARENT_RUN_TAG] = parent_run_id
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in wanted.items() if "'" not in v)
    found = MlflowClient(tracking_uri).search_runs([experiment_id], filter_string=query, max_results=50,
                                                   order_by=["attributes.start_time ASC"])
    for run in found:
        if all(run.data.tags.get(k) == v for k, v in wanted.items()) and (
                parent_run_id or PARENT_RUN_TAG not in run.data.tags):
            return MlflowRun(tracking_uri, run.info.run_id)
    return None


def find_or_start_run(tracking_uri: str, experiment_id: str, *, run_name: str, tags: Mapping[str, Any],
                      parent_run_id: str | None = None) -> tuple[MlflowRun, bool]:
    """The run that :func:`find_run` finds, else a new one with these tags: running the same thing again (a
    restarted trial, a worker restored from a checkpoint, ``--resume``) continues its run instead of adding one.
    Returns ``(run, created)``."""
    found = find_run(tracking_uri, experiment_id, tags=tags, parent_run_id=parent_run_id)
    if found is not None:
        return found, False
    return start_run(tracking_uri, experiment_id, run_name=run_name, parent_run_id=parent_run_id, tags=tags), True


def log_confusion(run: MlflowRun, confusion: Sequence[Sequence[int]], class_names: Sequence[str],
                  name: str | None = None) -> None:
    """The confusion matrix (rows = true class, columns = predicted) as ``<name>.json`` and ``<name>.png``."""
    from ser_platform.metrics import confusion_figure
    from ser_platform.tracking.schema import CONFUSION_ARTIFACT

    name = name or CONFUSION_ARTIFACT
    matrix = [[int(v) for v in row] for row in confusion]
    run.log_dict({"classes": list(class_names), "matrix": matrix}, f"{name}.json")
    run.log_figure(confusion_figure(matrix, class_names), f"{name}.png")


# --- the selected model of a fold run (what `ser predict` loads) --------------------------------------------

def frozen_encoder_keys(state_dict: Mapping[str, Any], config: Any) -> list[str]:
    """Keys of the frozen encoders' own weights, rebuilt exactly from the config and not worth storing
    (``models.ser_model.rebuilt_weight_keys``)."""
    from ser_platform.models.ser_model import rebuilt_weight_keys

    return rebuilt_weight_keys(state_dict, config.model)


def log_model(run: MlflowRun, state_dict: Mapping[str, Any], config: Any,
              info: Mapping[str, Any] | None = None) -> int:
    """Log a fold's selected (best-validation) weights and its resolved config as artifacts ``model/`` of the
    fold run: the weights (frozen encoders' left out, see :func:`frozen_encoder_keys`), the config and an info
    file (``info`` plus the format version and what was left out). Returns the size of the weights in bytes."""
    import torch

    from ser_platform.tracking import schema

    left_out = set(frozen_encoder_keys(state_dict, config))
    weights = {k: v.detach().to("cpu") for k, v in state_dict.items() if k not in left_out}
    with tempfile.TemporaryDirectory(prefix="ser-model-") as tmp:
        folder = Path(tmp) / schema.MODEL_ARTIFACT_DIR
        folder.mkdir()
        torch.save(weights, folder / schema.MODEL_WEIGHTS_FILE)
        (folder / schema.MODEL_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1, default=list))
        size = (folder / schema.MODEL_WEIGHTS_FILE).stat().st_size
        (folder / schema.MODEL_INFO_FILE).write_text(json.dumps({
            **dict(info or {}), "format_version": schema.MODEL_FORMAT_VERSION, "weights_bytes": size,
            "frozen_encoders_left_out": bool(left_out)}, indent=1, default=str))
        run.log_artifacts(folder, schema.MODEL_ARTIFACT_DIR)
    return size
