"""The paper's Tables 1-4 (of Table 4 its runnable part), generated from logged MLflow runs (never hand-typed),
and paired run comparisons.

What a sweep logs (``ser_platform.sweep``) and these tables read back through ``MlflowClient``:

* a parent run per sweep, tag ``ser.role = sweep``;
* a child run per Tune trial, tag ``ser.role = trial``, params ``table`` ("1" .. "4"), ``variant``
  ("Full model", "without FA", ..., or "search" for an Optuna trial), ``protocol``, ``folds``, ``seed`` and every
  dotted config key (``loss.alpha``, ``loss.beta``, ``loss.margin``, ``loss.space``, ``model.focus_attention``...);
  metrics ``val_ua_mean``, ``test_wa_mean``, ``test_wa_std``, ``test_ua_mean``, ``test_ua_std``... (the fold
  summary of ``train_folds``), ``folds_completed``, and per-fold histories ``fold_test_wa``, ``fold_test_ua``,
  ``fold_val_wa``, ``fold_val_ua``, ``fold_best_epoch`` with step = fold number;
* a grandchild run per fold, created by ``train_folds``.

A table row takes only *complete* trials (status FINISHED and ``folds_completed`` equal to the number of folds the
trial was configured with), so a table never mixes stopped and finished trials; the others are listed under it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import unquote, urlparse

import numpy as np
import scipy.stats

from ser_platform.tracking import PARENT_RUN_TAG as PARENT_TAG
from ser_platform.tracking import ROLE_TAG  # "sweep" on a sweep's parent run, "trial" on each trial run

# --- the schema of logged runs (written by sweep.py, read here) -------------------------------------------

SWEEP_TAG = "ser.sweep"  # the sweep's name, on parent and trial runs
TRIAL_ID_TAG = "ser.trial_id"  # Tune's trial id, on the trial run (how a restarted trial finds its run)
KIND_TAG = "ser.kind"  # "search" | "grid" | "ablation" | "embedding_space" | "compare_models", on the parent run
SEARCH_VARIANT = "search"

# --- the paper's own numbers (WA, UA), from the paper's text, shown beside ours -------------------------------

TABLE1_ROWS = (  # (model letter, variant name as logged, the paper's "Method" column, paper WA, paper UA)
    ("A", "Full model", "Full model", 0.774, 0.777),
    ("B", "without FA", "Full model without FA mechanism", 0.762, 0.755),
    ("C", "without metric loss", "Full model without Metric Loss", 0.752, 0.730),
)
TABLE2_ROWS = (  # (loss, alpha, beta, paper WA, paper UA)
    ("CE Loss", 0.0, 1.0, 0.752, 0.730),
    ("Joint Loss", 0.5, 1.0, 0.771, 0.763),
    ("Joint Loss", 1.0, 0.5, 0.764, 0.756),
    ("Joint Loss", 1.0, 1.0, 0.761, 0.762),
)
TABLE3_ROWS = (  # (loss.space, the paper's "Embedding Space" column, paper WA, paper UA)
    ("fused", "Speech + Text Embedding", 0.771, 0.763),
    ("speech", "Speech Embedding", 0.774, 0.777),
    ("text", "Text Embedding", 0.756, 0.749),
)
TABLE4_ROWS = (  # (variant name as logged, the "Model" column, paper WA, paper UA): only "Ours" is the paper's
    ("Speech only", "Speech only (no text encoder)", None, None),
    ("Text only", "Text only (no speech encoder)", None, None),
    ("Early fusion", "Early fusion (pooled speech ; text -> F(x))", None, None),
    ("Crossmodal without FA", "Crossmodal transformer without FA", None, None),
    ("Full model", "Ours (crossmodal + FA + joint loss)", 0.774, 0.777),
)
# The published models the paper's Table 4 compares against (not re-implemented here): (name, ref, WA, UA).
TABLE4_PUBLISHED = (("LSTM+Attn", 11, 0.725, 0.709), ("KS-transformer", 14, 0.743, 0.753), ("WISE", 13, 0.759, 0.764),
                    ("LM-MulT", 12, 0.768, 0.771), ("MHA-2", 7, 0.765, 0.776))
TITLES = {
    "1": "Table 1: ablation of the framework's components",
    "2": "Table 2: weights of the metric (alpha) and cross-entropy (beta) losses",
    "3": "Table 3: where the metric loss is applied (embedding space)",
    "4": "Table 4 (runnable part): the model against its own baselines, same encoders, loss and folds",
}
PAPER_NOTE = "paper: IEMOCAP, 5,531 utterances, 4 classes; its WA/UA beside ours for reference only"


class TablesError(ValueError):
    """No MLflow store, experiment or runs where the tables were asked for; the message says where it looked."""


# --- records ------------------------------------------------------------------------------------------------

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
        return self.params.get("table", "")

    @property
    def variant(self) -> str:
        return self.params.get("variant", "")

    @property
    def folds_expected(self) -> int:
        return len([f for f in self.params.get("folds", "").split(",") if f.strip()])

    @property
    def folds_completed(self) -> int:
        value = self.metrics.get("folds_completed", 0.0)
        return int(value) if math.isfinite(value) else 0

    @property
    def complete(self) -> bool:
        return (self.status == "FINISHED" and self.folds_expected > 0
                and self.folds_completed == self.folds_expected and "test_ua_mean" in self.metrics)

    def param_float(self, key: str) -> float:
        return float(self.params[key])

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


def _trial_record(run: Any) -> TrialRecord:
    return TrialRecord(
        run_id=run.info.run_id, run_name=run.info.run_name or "", parent_run_id=run.data.tags.get(PARENT_TAG, ""),
        status=run.info.status, start_time=int(run.info.start_time or 0), params=dict(run.data.params),
        metrics={k: float(v) for k, v in run.data.metrics.items()},
    )


def _search_all(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def collect_sweeps(client: Any, experiment_id: str, parent_run_id: str | None = None) -> list[SweepRecord]:
    """Sweeps (parent runs) of an experiment with their trial runs, oldest first; one sweep if ``parent_run_id``."""
    if parent_run_id is not None:
        parents = [client.get_run(parent_run_id)]
    else:
        parents = _search_all(client, experiment_id, f"tags.`{ROLE_TAG}` = 'sweep'")
    trials = _search_all(client, experiment_id, f"tags.`{ROLE_TAG}` = 'trial'")
    by_parent: dict[str, list[TrialRecord]] = {}
    for run in trials:
        record = _trial_record(run)
        by_parent.setdefault(record.parent_run_id, []).append(record)
    sweeps = [
        SweepRecord(run_id=p.info.run_id, name=p.info.run_name or p.data.tags.get(SWEEP_TAG, ""),
                    kind=p.data.tags.get(KIND_TAG, ""), start_time=int(p.info.start_time or 0),
                    trials=tuple(sorted(by_parent.get(p.info.run_id, []), key=lambda t: t.start_time)))
        for p in parents
    ]
    return sorted(sweeps, key=lambda s: s.start_time)


# --- one table ------------------------------------------------------------------------------------------------

@dataclass
class Table:
    """A table in the paper's layout: ``header`` and ``rows`` of strings, and the numbers as columns (``data``)."""

    number: str
    title: str
    header: list[str]
    rows: list[list[str]]
    caption: str
    data: dict[str, list[Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return f"table{self.number}" + ("_search" if "search" in self.title else "")


def _mean_std(record: TrialRecord | None, key: str) -> str:
    if record is None:
        return "—"
    return f"{record.metrics[f'{key}_mean']:.3f} ± {record.metrics.get(f'{key}_std', float('nan')):.3f}"


def _latest_complete(records: Iterable[TrialRecord]) -> TrialRecord | None:
    complete = [r for r in records if r.complete]
    return max(complete, key=lambda r: r.start_time) if complete else None


def _pending_state(records: Sequence[TrialRecord]) -> str:
    return "; ".join(r.state() for r in records) if records else "not run"


def _caption(sweep: SweepRecord, records: Sequence[TrialRecord]) -> str:
    def values(key: str) -> str:
        seen = sorted({r.params.get(key, "?") for r in records})
        return ", ".join(seen) if seen else "?"

    dataset = values("data.dataset")
    dataset = ", ".join(Path(d).name or d for d in dataset.split(", "))
    seeds = sorted({int(r.params.get("train.seeds", "1")) for r in records}) or [1]  # absent: logged before seeds
    over = "the folds" if seeds == [1] else "the folds × seeds"
    count = "/".join(map(str, seeds)) + (" seed" if seeds == [1] else " seeds")
    return (f"Mean ± std over {over} of each configuration (one fold = one test session; {count}). "
            f"Protocol {values('protocol')}; folds {values('folds')}; training seed(s) {values('seed')}; "
            f"dataset {dataset}; preset {values('preset')}; epochs {values('train.epochs')}; "
            f"model selection on {values('sweep.metric')} (validation speakers, never the test session). "
            f"Sweep '{sweep.name}' (MLflow run {sweep.run_id}). WA = accuracy, UA = mean per-class recall; "
            f"{PAPER_NOTE}.")


def _unmatched_notes(records: Sequence[TrialRecord], used: set[str]) -> list[str]:
    notes = []
    for r in records:
        if r.run_id not in used and not r.complete:
            notes.append(f"excluded: trial run {r.run_name or r.run_id} ({r.state()})")
    return notes


def _paper(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _columns(rows: Sequence[tuple[TrialRecord | None, float | None, float | None]]) -> dict[str, list[Any]]:
    """Numeric columns for ``mlflow.log_table``."""

    def metric(r: TrialRecord | None, key: str) -> float | None:
        return None if r is None else r.metrics.get(key)

    return {
        "run_id": [None if r is None else r.run_id for r, _, _ in rows],
        "wa_mean": [metric(r, "test_wa_mean") for r, _, _ in rows],
        "wa_std": [metric(r, "test_wa_std") for r, _, _ in rows],
        "ua_mean": [metric(r, "test_ua_mean") for r, _, _ in rows],
        "ua_std": [metric(r, "test_ua_std") for r, _, _ in rows],
        "val_ua_mean": [metric(r, "val_ua_mean") for r, _, _ in rows],
        "paper_wa": [wa for _, wa, _ in rows],
        "paper_ua": [ua for _, _, ua in rows],
    }


def table1(sweep: SweepRecord) -> Table:
    """Table 1 (ablation): one row per variant, model letters A-C as in the paper."""
    records = [t for t in sweep.trials if t.table == "1"]
    rows, picked, used = [], [], set()
    for letter, variant, method, paper_wa, paper_ua in TABLE1_ROWS:
        matching = [r for r in records if r.variant == variant]
        best = _latest_complete(matching)
        if best is not None:
            used.add(best.run_id)
        rows.append([letter, method, _mean_std(best, "test_wa"), _mean_std(best, "test_ua"),
                     _mean_std(best, "val_ua") if best else _pending_state(matching),
                     _paper(paper_wa), _paper(paper_ua)])
        picked.append((best, paper_wa, paper_ua))
    data = {"model": [r[0] for r in TABLE1_ROWS], "method": [r[2] for r in TABLE1_ROWS], **_columns(picked)}
    return Table("1", TITLES["1"], ["Model", "Method", "WA", "UA", "val UA", "paper WA", "paper UA"], rows,
                 _caption(sweep, records), data, _unmatched_notes(records, used))


def _is_close(a: float, b: float) -> bool:
    return abs(a - b) < 1e-9


def table2(sweep: SweepRecord) -> Table:
    """Table 2 (loss weights): the paper's four (alpha, beta) points, as run by ``--grid paper``."""
    records = [t for t in sweep.trials if t.table == "2" and t.variant != SEARCH_VARIANT]
    rows, picked, used = [], [], set()
    for loss, alpha, beta, paper_wa, paper_ua in TABLE2_ROWS:
        matching = [r for r in records if _is_close(r.param_float("loss.alpha"), alpha)
                    and _is_close(r.param_float("loss.beta"), beta)]
        best = _latest_complete(matching)
        if best is not None:
            used.add(best.run_id)
        rows.append([loss, f"{alpha:g}", f"{beta:g}", _mean_std(best, "test_wa"), _mean_std(best, "test_ua"),
                     _mean_std(best, "val_ua") if best else _pending_state(matching),
                     _paper(paper_wa), _paper(paper_ua)])
        picked.append((best, paper_wa, paper_ua))
    data = {"loss": [r[0] for r in TABLE2_ROWS], "alpha": [r[1] for r in TABLE2_ROWS],
            "beta": [r[2] for r in TABLE2_ROWS], **_columns(picked)}
    return Table("2", TITLES["2"], ["Loss", "α", "β", "WA", "UA", "val UA", "paper WA", "paper UA"], rows,
                 _caption(sweep, records), data, _unmatched_notes(records, used))


def _paper_table2(alpha: float, beta: float, space: str) -> tuple[float | None, float | None]:
    # The paper's Table 2 applies the metric loss to the fused embedding (its (0.5, 1) row equals Table 3's fused).
    for _, a, b, wa, ua in TABLE2_ROWS:
        if _is_close(alpha, a) and _is_close(beta, b) and space == "fused":
            return wa, ua
    return None, None


def table2_search(sweep: SweepRecord, metric: str = "val_ua_mean") -> Table:
    """Table 2 as an Optuna search: every complete trial, best objective first (the objective is validation UA)."""
    records = [t for t in sweep.trials if t.table == "2" and t.variant == SEARCH_VARIANT]
    complete = sorted((r for r in records if r.complete), key=lambda r: -r.metrics.get(metric, -math.inf))
    rows, picked = [], []
    for r in complete:
        alpha, beta = r.param_float("loss.alpha"), r.param_float("loss.beta")
        space = r.params.get("loss.space", "?")
        paper_wa, paper_ua = _paper_table2(alpha, beta, space)
        rows.append(["CE Loss" if alpha == 0 else "Joint Loss", f"{alpha:.3f}", f"{beta:.3f}",
                     f"{r.param_float('loss.margin'):.3f}", space, _mean_std(r, "val_ua"),
                     _mean_std(r, "test_wa"), _mean_std(r, "test_ua"), _paper(paper_wa), _paper(paper_ua)])
        picked.append((r, paper_wa, paper_ua))
    data = {"alpha": [r.param_float("loss.alpha") for r in complete],
            "beta": [r.param_float("loss.beta") for r in complete],
            "margin": [r.param_float("loss.margin") for r in complete],
            "space": [r.params.get("loss.space") for r in complete], **_columns(picked)}
    title = "Table 2 (search): Optuna TPE over alpha, beta, the margin M and the metric-loss space, best first"
    return Table("2", title, ["Loss", "α", "β", "M", "space", "val UA (objective)", "WA", "UA", "paper WA",
                              "paper UA"], rows, _caption(sweep, records), data, _unmatched_notes(records, set()))


def table3(sweep: SweepRecord) -> Table:
    """Table 3 (embedding space of the metric loss): fused, speech, text."""
    records = [t for t in sweep.trials if t.table == "3"]
    rows, picked, used = [], [], set()
    for space, label, paper_wa, paper_ua in TABLE3_ROWS:
        matching = [r for r in records if r.params.get("loss.space") == space]
        best = _latest_complete(matching)
        if best is not None:
            used.add(best.run_id)
        rows.append([label, _mean_std(best, "test_wa"), _mean_std(best, "test_ua"),
                     _mean_std(best, "val_ua") if best else _pending_state(matching),
                     _paper(paper_wa), _paper(paper_ua)])
        picked.append((best, paper_wa, paper_ua))
    data = {"embedding_space": [r[1] for r in TABLE3_ROWS], "loss.space": [r[0] for r in TABLE3_ROWS],
            **_columns(picked)}
    return Table("3", TITLES["3"], ["Embedding Space", "WA", "UA", "val UA", "paper WA", "paper UA"], rows,
                 _caption(sweep, records), data, _unmatched_notes(records, used))


def table4(sweep: SweepRecord) -> Table:
    """Table 4 (runnable part): one modality alone, early fusion, crossmodal without FA, the full model."""
    records = [t for t in sweep.trials if t.table == "4"]
    rows, picked, used = [], [], set()
    for variant, label, paper_wa, paper_ua in TABLE4_ROWS:
        matching = [r for r in records if r.variant == variant]
        best = _latest_complete(matching)
        if best is not None:
            used.add(best.run_id)
        rows.append([label, _mean_std(best, "test_wa"), _mean_std(best, "test_ua"),
                     _mean_std(best, "val_ua") if best else _pending_state(matching),
                     _paper(paper_wa), _paper(paper_ua)])
        picked.append((best, paper_wa, paper_ua))
    data = {"variant": [r[0] for r in TABLE4_ROWS], "model": [r[1] for r in TABLE4_ROWS], **_columns(picked)}
    published = "; ".join(f"{name} [{ref}] {wa:.3f}/{ua:.3f}" for name, ref, wa, ua in TABLE4_PUBLISHED)
    notes = [f"paper's Table 4 also lists published models (WA/UA), not re-implemented here: {published}",
             *_unmatched_notes(records, used)]
    return Table("4", TITLES["4"], ["Model", "WA", "UA", "val UA", "paper WA", "paper UA"], rows,
                 _caption(sweep, records), data, notes)


def sweep_tables(sweep: SweepRecord) -> list[Table]:
    """Every table a sweep's trials fill, in table order."""
    tables = []
    kinds = {(t.table, t.variant == SEARCH_VARIANT) for t in sweep.trials}
    if ("1", False) in kinds:
        tables.append(table1(sweep))
    if ("2", False) in kinds:
        tables.append(table2(sweep))
    if ("2", True) in kinds:
        tables.append(table2_search(sweep))
    if ("3", False) in kinds:
        tables.append(table3(sweep))
    if ("4", False) in kinds:
        tables.append(table4(sweep))
    for table in tables:
        table.notes += _seed_spread_notes(table, sweep)
    return tables


def _seed_spread_notes(table: Table, sweep: SweepRecord) -> list[str]:
    """Per row run with several seeds (``train.seeds``): the spread over seeds within each fold (std of test UA,
    logged by ``train.summarize_trial`` as ``test_ua_seed_std_fold<k>``)."""
    by_id = {t.run_id: t for t in sweep.trials}
    notes = []
    for run_id in table.data.get("run_id", []):
        record = by_id.get(run_id)
        if record is None or "test_ua_seed_std" not in record.metrics:
            continue
        prefix = "test_ua_seed_std_fold"
        folds = sorted(int(k[len(prefix):]) for k in record.metrics if k.startswith(prefix))
        per_fold = ", ".join(f"fold {f} {record.metrics[f'{prefix}{f}']:.3f}" for f in folds)
        name = record.variant or record.run_name
        notes.append(f"spread over {int(record.metrics.get('num_seeds', 0))} seeds, {name}: std of test UA within "
                     f"a fold: {per_fold} (mean {record.metrics['test_ua_seed_std']:.3f})")
    return notes


# --- rendering ------------------------------------------------------------------------------------------------

def format_table(table: Table) -> str:
    """Plain text with aligned columns, the caption and notes under it."""
    widths = [max(len(str(row[i])) for row in [table.header, *table.rows]) for i in range(len(table.header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [table.title, line(table.header), line(["-" * w for w in widths])]
    out += [line(row) for row in table.rows] or ["(no complete trial)"]
    out.append(table.caption)
    out += table.notes
    return "\n".join(out)


def table_markdown(table: Table) -> str:
    """GitHub-flavoured markdown: title, pipe table, caption and notes."""
    out = [f"**{table.title}**", "", "| " + " | ".join(table.header) + " |",
           "|" + "|".join("---" for _ in table.header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in table.rows]
    out += ["", f"_{table.caption}_"]
    out += [f"- {note}" for note in table.notes]
    return "\n".join(out) + "\n"


def log_tables(client: Any, parent_run_id: str, tables: Sequence[Table]) -> list[str]:
    """Log each table on the sweep's parent run as an MLflow table artifact and as markdown; return the paths."""
    paths = []
    for table in tables:
        client.log_table(parent_run_id, data=table.data, artifact_file=f"tables/{table.slug}.json")
        client.log_text(parent_run_id, table_markdown(table), f"tables/{table.slug}.md")
        paths += [f"tables/{table.slug}.json", f"tables/{table.slug}.md"]
    return paths


# --- paired comparison of two trial runs ------------------------------------------------------------------------

@dataclass(frozen=True)
class PairedComparison:
    """Per-fold scores of two runs on their common folds, the differences and paired tests (B - A)."""

    run_a: str
    run_b: str
    metric: str
    folds: tuple[int, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]
    mean_difference: float
    std_difference: float
    t_statistic: float
    t_pvalue: float
    wilcoxon_pvalue: float


def paired_comparison(scores_a: dict[int, float], scores_b: dict[int, float], *, run_a: str = "A",
                      run_b: str = "B", metric: str = "fold_test_ua") -> PairedComparison:
    """Paired t-test and Wilcoxon signed-rank test of B - A over the folds both runs have (two-sided)."""
    folds = tuple(sorted(set(scores_a) & set(scores_b)))
    if len(folds) < 2:
        raise TablesError(f"{run_a} and {run_b} share {len(folds)} fold(s) of {metric}; a paired comparison "
                          f"needs at least 2 (folds of {run_a}: {sorted(scores_a)}, of {run_b}: {sorted(scores_b)})")
    a = np.array([scores_a[f] for f in folds])
    b = np.array([scores_b[f] for f in folds])
    diff = b - a
    if np.allclose(diff, diff[0]):
        # Constant differences: the t statistic is undefined (zero variance) and Wilcoxon has no ranks to compare.
        t_stat, t_p = (math.inf if diff[0] != 0 else math.nan), (0.0 if diff[0] != 0 else 1.0)
        w_p = 1.0 if diff[0] == 0 else math.nan
    else:
        t_stat, t_p = scipy.stats.ttest_rel(b, a)
        w_p = float(scipy.stats.wilcoxon(b, a).pvalue) if np.any(diff != 0) else 1.0
    return PairedComparison(run_a, run_b, metric, folds, tuple(a.tolist()), tuple(b.tolist()),
                            float(diff.mean()), float(diff.std(ddof=1)), float(t_stat), float(t_p), w_p)


def format_comparison(comparisons: Sequence[PairedComparison]) -> str:
    out = []
    for c in comparisons:
        out.append(f"{c.metric}: B = {c.run_b} vs A = {c.run_a}, paired over folds {', '.join(map(str, c.folds))}")
        out.append("fold  A      B      B-A")
        for fold, a, b in zip(c.folds, c.a, c.b):
            out.append(f"{fold:<4}  {a:.3f}  {b:.3f}  {b - a:+.3f}")
        out.append(f"mean B-A {c.mean_difference:+.4f} ± {c.std_difference:.4f} (std over folds); "
                   f"paired t = {c.t_statistic:.3f}, p = {c.t_pvalue:.3g}; Wilcoxon p = {c.wilcoxon_pvalue:.3g}"
                   f" (two-sided; with {len(c.folds)} folds Wilcoxon cannot go below "
                   f"{2 / 2 ** len(c.folds):.3g})")
        out.append("")
    return "\n".join(out).rstrip()


def _fold_scores(client: Any, run_id: str, metric: str) -> dict[int, float]:
    history = client.get_metric_history(run_id, metric)
    # A restarted trial may log a fold twice; the latest value wins.
    return {int(m.step): float(m.value) for m in sorted(history, key=lambda m: m.timestamp)}


def resolve_trial_run(client: Any, experiment_id: str, ref: str) -> TrialRecord:
    """A trial run by run id, run name or variant name (the latest complete one when several match)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(ref)
        if run.info.experiment_id == experiment_id or not experiment_id:
            return _trial_record(run)
    except MlflowException:
        pass
    quoted = ref.replace("'", "\\'")
    for filter_string in (f"attributes.run_name = '{quoted}' and tags.`{ROLE_TAG}` = 'trial'",
                          f"params.variant = '{quoted}' and tags.`{ROLE_TAG}` = 'trial'"):
        records = [_trial_record(r) for r in _search_all(client, experiment_id, filter_string)]
        best = _latest_complete(records)
        if best is not None:
            return best
    raise TablesError(f"no complete trial run with id, name or variant {ref!r} in experiment {experiment_id}")


def compare_runs(client: Any, experiment_id: str, ref_a: str, ref_b: str) -> list[PairedComparison]:
    """Paired comparisons (test WA, test UA) of two trial runs over their common folds."""
    a = resolve_trial_run(client, experiment_id, ref_a)
    b = resolve_trial_run(client, experiment_id, ref_b)
    return [paired_comparison(_fold_scores(client, a.run_id, metric), _fold_scores(client, b.run_id, metric),
                              run_a=a.run_name or a.run_id, run_b=b.run_name or b.run_id, metric=metric)
            for metric in ("fold_test_wa", "fold_test_ua")]


# --- the command --------------------------------------------------------------------------------------------------

def _check_store(uri: str) -> None:
    """A sqlite store that does not exist would be created empty by MLflow: say where we looked instead."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = unquote(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else parsed.path
        if path and path != ":memory:" and not Path(path).exists():
            raise TablesError(f"no MLflow store at {uri} ({Path(path).resolve()} does not exist); pass "
                              f"--mlflow-uri or run from the folder that holds mlflow.db")


def _experiment_id(client: Any, experiment: str, uri: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TablesError(f"no MLflow experiment named {experiment!r} at {uri}; experiments there: {names}")
    return found.experiment_id


def latest_tables(sweeps: Sequence[SweepRecord]) -> list[tuple[SweepRecord, Table]]:
    """For each table, the most recent sweep that has trials for it."""
    chosen: dict[str, tuple[SweepRecord, Table]] = {}
    for sweep in sweeps:  # oldest first: later sweeps replace earlier ones
        for table in sweep_tables(sweep):
            chosen[table.slug] = (sweep, table)
    return sorted(chosen.values(), key=lambda pair: pair[1].slug)


def tables_command(*, experiment: str, mlflow_uri: str | None = None,
                   compare: Sequence[str] | None = None) -> int:
    """``ser tables``: print Tables 1-4 of an MLflow experiment and log them on their sweeps' parent runs."""
    from mlflow import MlflowClient

    from ser_platform.config import Config, TrackingConfig
    from ser_platform.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(Config(tracking=TrackingConfig(mlflow_uri=mlflow_uri or "")))
    _check_store(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, experiment, uri)
    if compare:
        if len(compare) != 2:
            raise TablesError(f"--compare takes two runs, got {list(compare)}")
        print(format_comparison(compare_runs(client, experiment_id, compare[0], compare[1])))
        return 0
    sweeps = collect_sweeps(client, experiment_id)
    pairs = latest_tables(sweeps)
    if not pairs:
        raise TablesError(f"experiment {experiment!r} at {uri} has no sweep with trial runs; run experiments/"
                          f"sweep_loss_weights.py, ablation.py, embedding_space.py or compare_models.py first")
    for sweep, table in pairs:
        print(format_table(table))
        older = [s.name for s in sweeps if s.start_time < sweep.start_time
                 and any(t.slug == table.slug for t in sweep_tables(s))]
        if older:
            print(f"(older sweeps with this table, not shown: {', '.join(older)})")
        print()
        log_tables(client, sweep.run_id, [table])
    print(f"logged on the parent runs under artifacts/tables/ (experiment {experiment!r}, {uri})",
          file=sys.stderr)
    return 0
