"""Sweeps: Ray Tune + Optuna over the loss, every trial on every fold, MLflow parent/trial/fold runs, resume.

On the tier's local Ray instance (tests/integration/conftest.py), with ``support.standin_train_folds`` in place
of ``train_folds`` (same signature, numbers computed from the config by a formula, fold runs logged like
``train_folds`` does), so they exercise Tune's and MLflow's bookkeeping in seconds; a sweep that really trains is
tests/e2e/test_sweep_e2e.py's.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import support
from ser_platform.catalogue import PAPER_GRID
from ser_platform.config import load_config
from ser_platform.sweep import run_sweep
from support import SWEEP_BLOCK_ENV, SWEEP_CALLS_ENV, standin_scores, standin_train_folds, sweep_driver, tune_trials

# Table 2's rows as (alpha, beta, paper WA, paper UA), from the catalogue the grid is built from.
TABLE2_POINTS = [(row.overrides["loss.alpha"], row.overrides["loss.beta"], *row.paper) for row in PAPER_GRID.rows]



# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_address(ray_cluster):
    import ray

    ray.cloudpickle.register_pickle_by_value(support)  # Ray workers cannot import the tests' helpers
    return ray_cluster


def _config(tmp: Path, dataset: str, **overrides):
    """The stand-in reads no data, but the sweep checks the dataset at start: the shared training dataset."""
    base = {"data.dataset": dataset, "tracking.mlflow_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "tracking.storage": str(tmp / "runs"), "tracking.experiment": "test_sweep"}
    return load_config("demo", overrides={**base, **overrides})


def _runs(uri: str, experiment: str, filter_string: str = "", view=None):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], filter_string, run_view_type=view or ViewType.ACTIVE_ONLY,
                              max_results=1000)


# --- tests (the search space itself: tests/unit/test_sweep_space.py) -----------------------------------------

def test_paper_grid_runs_exactly_table2_points(ray_address, tmp_path, training_dataset):
    config = _config(tmp_path, training_dataset, **{"sweep.grid": "paper"})
    result = run_sweep(config, name="grid", train_fn=standin_train_folds, verbose=False)
    assert result.status == "FINISHED" and result.errors == 0
    trials = _runs(result.mlflow_uri, "test_sweep", "tags.`ser.role` = 'trial'")
    points = sorted((float(r.data.params["loss.alpha"]), float(r.data.params["loss.beta"])) for r in trials)
    assert points == sorted((alpha, beta) for alpha, beta, _, _ in TABLE2_POINTS)
    for run in trials:  # three levels: sweep -> trial -> fold, and the trial's summary is the folds' mean
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.data.params["table"] == "2" and run.data.params["protocol"] == "loso5"
        folds = _runs(result.mlflow_uri, "test_sweep", f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert len(folds) == 5
        expected = [standin_scores(float(run.data.params["loss.alpha"]), float(run.data.params["loss.beta"]), f)
                    for f in (1, 2, 3, 4, 5)]
        assert run.data.metrics["test_ua_mean"] == pytest.approx(np.mean([e["test_ua"] for e in expected]))
        assert run.data.metrics["folds_completed"] == 5
    table = result.tables[0]
    assert table.number == "2" and [row[:3] for row in table.rows] == [
        ["CE Loss", "0", "1"], ["Joint Loss", "0.5", "1"], ["Joint Loss", "1", "0.5"], ["Joint Loss", "1", "1"]]
    # Each row: mean ± std over folds of the formula, computed here independently of the sweep and tables.
    for row, (alpha, beta, paper_wa, paper_ua) in zip(table.rows, TABLE2_POINTS):
        ua = np.array([standin_scores(alpha, beta, f)["test_ua"] for f in (1, 2, 3, 4, 5)])
        assert row[4] == f"{ua.mean():.3f} ± {ua.std():.3f}"
        assert row[-2:] == [f"{paper_wa:.3f}", f"{paper_ua:.3f}"]


def test_killed_sweep_resumes_without_redoing_finished_trials(ray_address, tmp_path, training_dataset):
    import optuna

    # One trial at a time (the demo runs its three at once), so the kill finds one finished and one running.
    config = _config(tmp_path, training_dataset, **{"sweep.trials": 3, "sweep.seed": 3, "sweep.max_concurrent": 1})
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))
    calls = tmp_path / "calls.txt"
    env = {**os.environ, SWEEP_CALLS_ENV: str(calls), "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONUNBUFFERED": "1"}
    first = sweep_driver(tmp_path, config_file, name="resumable", resume=False, env={**env, SWEEP_BLOCK_ENV: "1"},
                         address=ray_address)
    sweep_dir = tmp_path / "runs" / "resumable"
    deadline = time.monotonic() + 240
    try:
        # Kill once Tune's saved state has the first trial finished and the second one inside its training.
        while time.monotonic() < deadline:
            states = sorted(tune_trials(sweep_dir).values())
            training = set(calls.read_text().split()) if calls.exists() else set()
            if states == ["RUNNING", "TERMINATED"] and len(training) == 2:
                break
            assert first.poll() is None, f"sweep exited early:\n{first.stdout.read()}"
            time.sleep(0.5)
        else:
            pytest.fail(f"the first trial never finished in Tune's saved state: {tune_trials(sweep_dir)}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    killed_trial_runs = _runs(config.tracking.mlflow_uri, "test_sweep", "tags.`ser.role` = 'trial'")
    assert sorted(r.info.status for r in killed_trial_runs) == ["FINISHED", "RUNNING"]

    second = sweep_driver(tmp_path, config_file, name="resumable", resume=True, env=env, address=ray_address)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert result["status"] == "FINISHED" and len(result["trials"]) == 3

    seen = calls.read_text().split()
    finished_first, interrupted = killed_trial_runs[0].data.tags["ser.trial_id"], None
    for run in killed_trial_runs:
        if run.info.status == "RUNNING":
            interrupted = run.data.tags["ser.trial_id"]
        else:
            finished_first = run.data.tags["ser.trial_id"]
    assert seen.count(finished_first) == 1  # not redone
    assert seen.count(interrupted) == 2  # restarted from its start
    assert len(set(seen)) == 3 and len(seen) == 4

    parents = _runs(config.tracking.mlflow_uri, "test_sweep", "tags.`ser.role` = 'sweep'")
    assert [p.info.run_id for p in parents] == [result["parent"]]  # one parent, the same across the restart
    trial_runs = _runs(config.tracking.mlflow_uri, "test_sweep", "tags.`ser.role` = 'trial'")
    assert len(trial_runs) == 3 and {r.info.status for r in trial_runs} == {"FINISHED"}
    assert sorted(r.data.tags["ser.trial_id"] for r in trial_runs) == sorted(result["trials"])
    for run in trial_runs:  # the restarted trial found its fold runs again: each trial has its 5 folds once
        folds = _runs(config.tracking.mlflow_uri, "test_sweep", f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert len(folds) == 5
    study = optuna.load_study(study_name="resumable", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
