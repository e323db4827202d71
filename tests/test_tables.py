"""Tables 1-3 and paired comparisons, built from MLflow runs logged by the sweep's own logging functions.

No Ray: each test logs a sweep's parent and trial runs into a fresh SQLite store with known per-fold numbers,
then checks what the tables show against numpy on those numbers, and the paired tests against hand formulas
and a brute-force enumeration of sign flips.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
from mlflow import MlflowClient

from ser_platform import cli
from ser_platform.config import load_config
from ser_platform.sweep import (ABLATION, EMBEDDING_SPACE, SEARCH, TrialContext, log_trial_result, open_sweep_run,
                                open_trial_run, trial_overrides)
from ser_platform.tables import (TABLE1_ROWS, TABLE3_ROWS, TablesError, collect_sweeps, format_table,
                                 log_tables, paired_comparison, sweep_tables, table_markdown)
from ser_platform.tracking import ensure_store, experiment_id

FOLDS = (1, 2, 3, 4, 5)


def fold_result(scores: dict[int, float]) -> SimpleNamespace:
    """A TrialResult-shaped object: per-fold test UA from ``scores``, the other scores offset from it; summary
    with numpy's mean and population std (as train_folds)."""
    per_fold = {f: SimpleNamespace(fold=f, best_epoch=2, val_wa=ua + 0.02, val_ua=ua + 0.01, test_wa=ua + 0.03,
                                   test_ua=ua, confusion=[[1]]) for f, ua in scores.items()}
    summary = {}
    for key in ("val_wa", "val_ua", "test_wa", "test_ua"):
        values = np.array([getattr(per_fold[f], key) for f in sorted(per_fold)])
        summary[f"{key}_mean"], summary[f"{key}_std"] = float(values.mean()), float(values.std())
    return SimpleNamespace(per_fold=per_fold, summary=summary)


class Store:
    """An MLflow experiment of its own in a SQLite store, and helpers that log the way a sweep does."""

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        self.experiment = experiment
        self.client = MlflowClient(self.uri)
        self.experiment_id = experiment_id(self.uri, experiment)
        self.config = load_config("demo", overrides={"data.dataset": "/data/iemocap.parquet",
                                                     "tracking.mlflow_uri": uri, "tracking.experiment": experiment})

    def sweep(self, experiment, name: str) -> TrialContext:
        parent = open_sweep_run(self.client, self.experiment_id, name, experiment, self.config)
        return TrialContext(base_config=self.config.to_dict(), experiment=experiment, sweep_name=name,
                            mlflow_uri=self.uri, mlflow_experiment_id=self.experiment_id, parent_run_id=parent,
                            train_storage="unused")

    def trial(self, ctx: TrialContext, trial_id: str, params: dict, scores: dict[int, float] | None,
              status: str | None = None) -> str:
        """Log one trial; ``scores=None`` leaves it unfinished (``status`` then sets its state)."""
        variant, overrides = trial_overrides(ctx.experiment, params)
        config = self.config.replace(overrides)
        run = open_trial_run(self.client, ctx, trial_id, config, variant)
        if scores is not None:
            log_trial_result(self.client, run.info.run_id, fold_result(scores))
        elif status:
            self.client.set_terminated(run.info.run_id, status)
        return run.info.run_id


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    return ensure_store(f"sqlite:///{tmp_path_factory.mktemp('tables') / 'mlflow.db'}")  # schema once (seconds)


@pytest.fixture
def store(store_uri, request):
    return Store(store_uri, request.node.name)


def scores_for(offset: float) -> dict[int, float]:
    return {f: 0.5 + offset + 0.013 * f ** 1.5 for f in FOLDS}


def mean_std(scores: dict[int, float]) -> str:
    values = np.array(list(scores.values()))
    return f"{values.mean():.3f} ± {values.std():.3f}"


def test_table1_rows_are_mean_std_over_folds_and_skip_incomplete_trials(store):
    ctx = store.sweep(ABLATION, "ablation-1")
    offsets = {"Full model": 0.10, "without FA": 0.05, "without metric loss": 0.0}
    for i, (variant, offset) in enumerate(offsets.items()):
        store.trial(ctx, f"t{i}", {"variant": variant}, scores_for(offset))
    # A later attempt of "without FA" that failed after 2 folds: excluded, the complete one stays in the table.
    store.trial(ctx, "t9", {"variant": "without FA"}, None, status="FAILED")
    [sweep] = collect_sweeps(store.client, store.experiment_id)
    [table] = sweep_tables(sweep)
    assert table.number == "1"
    for row, (letter, variant, method, paper_wa, paper_ua) in zip(table.rows, TABLE1_ROWS):
        ua = scores_for(offsets[variant])
        wa = {f: v + 0.03 for f, v in ua.items()}
        assert row[:4] == [letter, method, mean_std(wa), mean_std(ua)]
        assert row[-2:] == [f"{paper_wa:.3f}", f"{paper_ua:.3f}"]
    assert table.notes == ["excluded: trial run without FA [t9] (failed, 0/5 folds)"]
    text = format_table(table)
    for word in ("Protocol loso5", "folds 1,2,3,4,5", "training seed(s) 0", "iemocap.parquet", "ablation-1"):
        assert word in text


def test_table3_and_search_table(store):
    spaces = store.sweep(EMBEDDING_SPACE, "spaces")
    for i, (space, label, _, _) in enumerate(TABLE3_ROWS):
        store.trial(spaces, f"s{i}", {"variant": space}, scores_for(0.01 * i))
    search = store.sweep(SEARCH, "search")
    points = [{"loss.alpha": 0.5, "loss.beta": 1.0, "loss.margin": 0.3, "loss.space": "fused"},
              {"loss.alpha": 0.9, "loss.beta": 0.4, "loss.margin": 1.2, "loss.space": "text"}]
    store.trial(search, "o1", points[0], scores_for(-0.05))
    store.trial(search, "o2", points[1], scores_for(0.08))
    store.trial(search, "o3", {**points[1], "loss.alpha": 0.2}, None)  # still running: not in the table
    sweeps = {s.name: s for s in collect_sweeps(store.client, store.experiment_id)}
    [table3] = sweep_tables(sweeps["spaces"])
    assert [row[0] for row in table3.rows] == [label for _, label, _, _ in TABLE3_ROWS]
    assert table3.rows[2][2] == mean_std(scores_for(0.02))
    [search_table] = sweep_tables(sweeps["search"])
    # Best validation UA first; the paper's numbers only where the point is one of its Table 2 rows (fused).
    assert [row[1:5] for row in search_table.rows] == [["0.900", "0.400", "1.200", "text"],
                                                       ["0.500", "1.000", "0.300", "fused"]]
    assert search_table.rows[0][-2:] == ["—", "—"] and search_table.rows[1][-2:] == ["0.771", "0.763"]
    assert search_table.rows[1][5] == mean_std({f: v + 0.01 for f, v in scores_for(-0.05).items()})
    assert search_table.notes == ["excluded: trial run trial o3 (running, 0/5 folds)"]


def test_tables_are_logged_on_the_parent_run(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)  # MlflowClient.load_table searches via the fluent API
    ctx = store.sweep(ABLATION, "logged")
    for i, variant in enumerate(ABLATION.variants):
        store.trial(ctx, f"t{i}", {"variant": variant}, scores_for(0.02 * i))
    [table] = sweep_tables(collect_sweeps(store.client, store.experiment_id)[0])
    paths = log_tables(store.client, ctx.parent_run_id, [table])
    assert paths == ["tables/table1.json", "tables/table1.md"]
    markdown = Path(store.client.download_artifacts(ctx.parent_run_id, "tables/table1.md", str(tmp_path)))
    assert markdown.read_text() == table_markdown(table)
    frame = store.client.load_table(store.experiment_id, "tables/table1.json", run_ids=[ctx.parent_run_id])
    assert frame["ua_mean"].tolist() == pytest.approx([np.mean(list(scores_for(0.02 * i).values()))
                                                       for i in range(3)])
    assert frame["paper_ua"].tolist() == [row[4] for row in TABLE1_ROWS]


def test_ser_tables_command(store, capsys, tmp_path):
    ctx = store.sweep(EMBEDDING_SPACE, "cli")
    for i, space in enumerate(EMBEDDING_SPACE.variants):
        store.trial(ctx, f"t{i}", {"variant": space}, scores_for(0.01 * i))
    assert cli.main(["tables", "--experiment", store.experiment, "--mlflow-uri", store.uri]) == 0
    out = capsys.readouterr().out
    assert "Table 3: where the metric loss is applied" in out and "Speech Embedding" in out
    artifacts = [a.path for a in store.client.list_artifacts(ctx.parent_run_id, "tables")]
    assert artifacts == ["tables/table3.json", "tables/table3.md"]

    assert cli.main(["tables", "--experiment", "nope", "--mlflow-uri", store.uri]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err
    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert cli.main(["tables", "--experiment", store.experiment, "--mlflow-uri", f"sqlite:///{missing}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not missing.exists()  # not created empty


def brute_force_wilcoxon_p(diff: np.ndarray) -> float:
    """Exact two-sided signed-rank p: the share of the 2^n sign assignments whose |W+ - W-| is as large."""
    ranks = scipy.stats.rankdata(np.abs(diff))
    observed = abs(np.sum(np.sign(diff) * ranks))
    flips = [abs(np.sum(np.array(signs) * ranks)) for signs in itertools.product((-1, 1), repeat=len(diff))]
    return float(np.mean(np.array(flips) >= observed - 1e-12))


def test_paired_comparison_matches_hand_formulas():
    a = {1: 0.61, 2: 0.55, 3: 0.58, 4: 0.66, 5: 0.52}
    b = {1: 0.64, 2: 0.56, 3: 0.63, 4: 0.65, 5: 0.60, 6: 0.9}  # fold 6 has no partner: left out
    result = paired_comparison(a, b)
    diff = np.array([b[f] - a[f] for f in range(1, 6)])
    t = diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff)))
    assert result.folds == (1, 2, 3, 4, 5)
    assert result.mean_difference == pytest.approx(diff.mean())
    assert result.t_statistic == pytest.approx(t)
    assert result.t_pvalue == pytest.approx(2 * scipy.stats.t.sf(abs(t), df=len(diff) - 1))
    assert result.wilcoxon_pvalue == pytest.approx(brute_force_wilcoxon_p(diff))
    with pytest.raises(TablesError, match="share 1 fold"):
        paired_comparison({1: 0.5}, {1: 0.6, 2: 0.7})


def test_ser_tables_compare_by_variant_name(store, capsys):
    ctx = store.sweep(ABLATION, "compare")
    store.trial(ctx, "a", {"variant": "Full model"}, scores_for(0.05))
    store.trial(ctx, "b", {"variant": "without FA"}, {f: v - 0.01 * f for f, v in scores_for(0.05).items()})
    assert cli.main(["tables", "--experiment", store.experiment, "--mlflow-uri", store.uri,
                     "--compare", "Full model", "without FA"]) == 0
    out = capsys.readouterr().out
    assert "fold_test_ua: B = without FA [b] vs A = Full model [a]" in out
    assert "mean B-A -0.0300" in out  # -(1+2+3+4+5)/5 * 0.01
