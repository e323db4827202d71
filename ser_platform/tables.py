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
Nor does it mix protocols: the protocol is a column, a sweep run under several gives one table per protocol, and a
table built from runs of two protocols raises ``TablesError``.

Paired comparisons (``ser tables --compare``, and under Tables 1 and 4) read the trials' per-fold series and hand
them to ``ser_platform.comparison.paired_comparison``, which owns the statistics.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import unquote, urlparse

from ser_platform.comparison import PairedComparison, format_comparison, paired_comparison
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
    protocol: str = ""  # the one protocol of its runs (a table never holds two)
    split: bool = False  # the sweep ran this table under several protocols: one table each, the protocol in the slug

    @property
    def slug(self) -> str:
        return (f"table{self.number}" + ("_search" if "search" in self.title else "")
                + (f"_{self.protocol}" if self.split else ""))


def _mean_std(record: TrialRecord | None, key: str) -> str:
    if record is None:
        return "—"
    return f"{record.metrics[f'{key}_mean']:.3f} ± {record.metrics.get(f'{key}_std', float('nan')):.3f}"


def protocol_of(record: TrialRecord) -> str:
    return record.params.get("protocol", "?")


def _one_protocol(number: str, picked: Sequence[TrialRecord | None]) -> str:
    """The protocol shared by a table's runs; a table refuses runs of different protocols (their folds are other
    test sets, so their means are not comparable in one column)."""
    protocols = {protocol_of(r): r for r in picked if r is not None}
    if len(protocols) > 1:
        runs = ", ".join(f"{r.run_name or r.run_id}: {p}" for p, r in sorted(protocols.items()))
        raise TablesError(f"Table {number} would mix protocols ({runs}); build one table per protocol "
                          f"(sweep_tables does)")
    return next(iter(protocols), "")


def _protocol_cell(record: TrialRecord | None) -> str:
    return "—" if record is None else protocol_of(record)


def _pick(matching: Sequence[TrialRecord], used: set[str]) -> TrialRecord | None:
    """A row's run: the latest complete one of those matching it, marked as used (the rest are listed as excluded)."""
    best = _latest_complete(matching)
    if best is not None:
        used.add(best.run_id)
    return best


def _result_cells(best: TrialRecord | None, matching: Sequence[TrialRecord], paper_wa: float | None,
                  paper_ua: float | None) -> list[str]:
    """The cells every row of Tables 1-4 ends with: WA, UA, val UA (or why the row has no complete run), the
    protocol, the paper's WA and UA."""
    return [_mean_std(best, "test_wa"), _mean_std(best, "test_ua"),
            _mean_std(best, "val_ua") if best else _pending_state(matching), _protocol_cell(best),
            _paper(paper_wa), _paper(paper_ua)]


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
        best = _pick(matching, used)
        rows.append([letter, method, *_result_cells(best, matching, paper_wa, paper_ua)])
        picked.append((best, paper_wa, paper_ua))
    protocol = _one_protocol("1", [r for r, _, _ in picked])
    data = {"model": [r[0] for r in TABLE1_ROWS], "method": [r[2] for r in TABLE1_ROWS], **_columns(picked)}
    return Table("1", TITLES["1"], ["Model", "Method", "WA", "UA", "val UA", "protocol", "paper WA", "paper UA"],
                 rows, _caption(sweep, records), data, _unmatched_notes(records, used), protocol)


def _is_close(a: float, b: float) -> bool:
    return abs(a - b) < 1e-9


def table2(sweep: SweepRecord) -> Table:
    """Table 2 (loss weights): the paper's four (alpha, beta) points, as run by ``--grid paper``."""
    records = [t for t in sweep.trials if t.table == "2" and t.variant != SEARCH_VARIANT]
    rows, picked, used = [], [], set()
    for loss, alpha, beta, paper_wa, paper_ua in TABLE2_ROWS:
        matching = [r for r in records if _is_close(r.param_float("loss.alpha"), alpha)
                    and _is_close(r.param_float("loss.beta"), beta)]
        best = _pick(matching, used)
        rows.append([loss, f"{alpha:g}", f"{beta:g}", *_result_cells(best, matching, paper_wa, paper_ua)])
        picked.append((best, paper_wa, paper_ua))
    protocol = _one_protocol("2", [r for r, _, _ in picked])
    data = {"loss": [r[0] for r in TABLE2_ROWS], "alpha": [r[1] for r in TABLE2_ROWS],
            "beta": [r[2] for r in TABLE2_ROWS], **_columns(picked)}
    return Table("2", TITLES["2"], ["Loss", "α", "β", "WA", "UA", "val UA", "protocol", "paper WA", "paper UA"],
                 rows, _caption(sweep, records), data, _unmatched_notes(records, used), protocol)


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
                     _mean_std(r, "test_wa"), _mean_std(r, "test_ua"), _protocol_cell(r), _paper(paper_wa),
                     _paper(paper_ua)])
        picked.append((r, paper_wa, paper_ua))
    data = {"alpha": [r.param_float("loss.alpha") for r in complete],
            "beta": [r.param_float("loss.beta") for r in complete],
            "margin": [r.param_float("loss.margin") for r in complete],
            "space": [r.params.get("loss.space") for r in complete], **_columns(picked)}
    protocol = _one_protocol("2", complete)
    title = "Table 2 (search): Optuna TPE over alpha, beta, the margin M and the metric-loss space, best first"
    return Table("2", title, ["Loss", "α", "β", "M", "space", "val UA (objective)", "WA", "UA", "protocol",
                              "paper WA", "paper UA"], rows, _caption(sweep, records), data,
                 _unmatched_notes(records, set()), protocol)


def table3(sweep: SweepRecord) -> Table:
    """Table 3 (embedding space of the metric loss): fused, speech, text."""
    records = [t for t in sweep.trials if t.table == "3"]
    rows, picked, used = [], [], set()
    for space, label, paper_wa, paper_ua in TABLE3_ROWS:
        matching = [r for r in records if r.params.get("loss.space") == space]
        best = _pick(matching, used)
        rows.append([label, *_result_cells(best, matching, paper_wa, paper_ua)])
        picked.append((best, paper_wa, paper_ua))
    protocol = _one_protocol("3", [r for r, _, _ in picked])
    data = {"embedding_space": [r[1] for r in TABLE3_ROWS], "loss.space": [r[0] for r in TABLE3_ROWS],
            **_columns(picked)}
    return Table("3", TITLES["3"], ["Embedding Space", "WA", "UA", "val UA", "protocol", "paper WA", "paper UA"],
                 rows, _caption(sweep, records), data, _unmatched_notes(records, used), protocol)


def table4(sweep: SweepRecord) -> Table:
    """Table 4 (runnable part): one modality alone, early fusion, crossmodal without FA, the full model."""
    records = [t for t in sweep.trials if t.table == "4"]
    rows, picked, used = [], [], set()
    for variant, label, paper_wa, paper_ua in TABLE4_ROWS:
        matching = [r for r in records if r.variant == variant]
        best = _pick(matching, used)
        rows.append([label, *_result_cells(best, matching, paper_wa, paper_ua)])
        picked.append((best, paper_wa, paper_ua))
    data = {"variant": [r[0] for r in TABLE4_ROWS], "model": [r[1] for r in TABLE4_ROWS], **_columns(picked)}
    published = "; ".join(f"{name} [{ref}] {wa:.3f}/{ua:.3f}" for name, ref, wa, ua in TABLE4_PUBLISHED)
    notes = [f"paper's Table 4 also lists published models (WA/UA), not re-implemented here: {published}",
             *_unmatched_notes(records, used)]
    protocol = _one_protocol("4", [r for r, _, _ in picked])
    return Table("4", TITLES["4"], ["Model", "WA", "UA", "val UA", "protocol", "paper WA", "paper UA"], rows,
                 _caption(sweep, records), data, notes, protocol)


# Paired comparisons under a table, when a client can read the runs' per-fold scores: Table 1's A vs B and A vs C
# (what the paper's ablation claims), and Table 4's full model against each baseline.
TABLE1_PAIRS = (("A", "B"), ("A", "C"))
TABLE4_PAIRS = tuple(("Full model", variant) for variant, *_ in TABLE4_ROWS if variant != "Full model")


def sweep_tables(sweep: SweepRecord, client: Any | None = None) -> list[Table]:
    """Every table a sweep's trials fill, in table order; one table per protocol when the sweep ran several (a
    table never puts two protocols in one column). With ``client`` Tables 1 and 4 also carry paired comparisons."""
    builders = ((("1", False), table1), (("2", False), table2), (("2", True), table2_search), (("3", False), table3),
                (("4", False), table4))
    tables = []
    for (number, search), build in builders:
        records = [t for t in sweep.trials if t.table == number and (t.variant == SEARCH_VARIANT) == search]
        protocols = sorted({protocol_of(t) for t in records})
        for protocol in protocols:
            part = SweepRecord(sweep.run_id, sweep.name, sweep.kind, sweep.start_time,
                               tuple(t for t in sweep.trials if protocol_of(t) == protocol))
            table = build(part)
            if len(protocols) > 1:
                table.title += f" — protocol {protocol}"
                table.split, table.protocol = True, protocol
            table.notes += _seed_spread_notes(table, sweep)
            if client is not None and number == "1":
                table.notes += _comparison_notes(client, table, sweep, TABLE1_PAIRS, "model")
            if client is not None and number == "4":
                table.notes += _comparison_notes(client, table, sweep, TABLE4_PAIRS, "variant")
            tables.append(table)
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


# --- paired comparison of two trial runs (the statistics are ser_platform.comparison's) ------------------------

# Params that must agree for two runs' folds to be the same test sets: the folds of loso5 and loso10 are other
# speakers, and a score on improvised utterances only is not paired with one on all of them.
MUST_MATCH = ("protocol", "data.eval_subset")


@dataclass(frozen=True)
class RunComparison:
    """A paired comparison of two trial runs on one metric: how they were paired, and the statistics."""

    metric: str  # "test_ua" | "test_wa"
    label_a: str
    label_b: str
    pairing: str  # "folds" (one score per fold: the mean over its seeds) or "folds x seeds"
    result: PairedComparison
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        name = f"test {self.metric.split('_')[1].upper()}"
        how = "per fold" if self.pairing == "folds" else "per (fold, seed)"
        return f"{format_comparison(self.result, name, label_a=self.label_a, label_b=self.label_b)} [{how}]"


def seed_series(record: TrialRecord) -> list[int]:
    """The seeds whose per-fold scores a trial run logged separately (``fold_test_ua.seed<S>``, train.seeds > 1)."""
    prefix = "fold_test_ua.seed"
    return sorted(int(k[len(prefix):]) for k in record.metrics if k.startswith(prefix))


def fold_scores(client: Any, record: TrialRecord, metric: str, *, by_seed: bool) -> dict[tuple[int, int], float]:
    """(fold, seed) -> score of ``metric`` ("test_ua", "test_wa") as logged by the trial's ``fold_<metric>``
    series (step = fold). ``by_seed=False``: one score per fold, the mean over its seeds, keyed (fold, 0)."""

    def history(key: str) -> dict[int, float]:
        # A restarted trial may log a fold twice; the latest value wins.
        return {int(m.step): float(m.value)
                for m in sorted(client.get_metric_history(record.run_id, key), key=lambda m: m.timestamp)}

    seeds = seed_series(record)
    if not by_seed:
        return {(fold, 0): value for fold, value in history(f"fold_{metric}").items()}
    if not seeds:  # one seed: the plain series is that seed's
        seed = int(record.params.get("seed", "0"))
        return {(fold, seed): value for fold, value in history(f"fold_{metric}").items()}
    return {(fold, seed): value for seed in seeds for fold, value in history(f"fold_{metric}.seed{seed}").items()}


def compare_records(client: Any, a: TrialRecord, b: TrialRecord, *, label_a: str, label_b: str,
                    metrics: Sequence[str] = ("test_ua", "test_wa"), pairings: Sequence[str] | None = None,
                    n_boot: int = 10_000, seed: int = 0) -> list[RunComparison]:
    """Paired comparisons (``comparison.paired_comparison``) of two complete trial runs, A − B.

    Refuses (``TablesError``) runs whose test sets differ (``MUST_MATCH``: protocol, evaluation subset) or whose
    folds differ. ``pairings``: "folds" (one score per fold, the mean over its seeds: the stricter test) and, when
    both runs have the same several seeds, also "folds x seeds"; by default both where they apply."""
    for key in MUST_MATCH:
        va, vb = a.params.get(key, "?"), b.params.get(key, "?")
        if va != vb:
            raise TablesError(f"{label_a} ({a.run_name or a.run_id}) has {key}={va}, {label_b} "
                              f"({b.run_name or b.run_id}) has {key}={vb}: their folds are not the same test "
                              f"sets, so they are not compared")
    seeds_a, seeds_b = seed_series(a), seed_series(b)
    notes = []
    if seeds_a != seeds_b:
        notes.append(f"seeds differ ({label_a}: {seeds_a or [a.params.get('seed', '?')]}, {label_b}: "
                     f"{seeds_b or [b.params.get('seed', '?')]}): paired by fold on each fold's seed mean")
    if a.params.get("data.dataset") != b.params.get("data.dataset"):
        notes.append(f"datasets differ ({a.params.get('data.dataset')} vs {b.params.get('data.dataset')})")
    available = ["folds"] + (["folds x seeds"] if seeds_a and seeds_a == seeds_b else [])
    chosen = [p for p in (pairings or available) if p in available]
    out = []
    for metric in metrics:
        for pairing in chosen:
            by_seed = pairing == "folds x seeds"
            sa, sb = (fold_scores(client, r, metric, by_seed=by_seed) for r in (a, b))
            folds_a, folds_b = {f for f, _ in sa}, {f for f, _ in sb}
            if folds_a != folds_b:
                raise TablesError(f"{label_a} and {label_b} were scored on different folds ({label_a}: "
                                  f"{sorted(folds_a)}, {label_b}: {sorted(folds_b)}); a paired comparison needs "
                                  f"the same folds")
            out.append(RunComparison(metric, label_a, label_b, pairing,
                                     paired_comparison(sa, sb, n_boot=n_boot, seed=seed), tuple(notes)))
    return out


def resolve_trial_run(client: Any, experiment_id: str, ref: str) -> TrialRecord:
    """A complete trial run by run id, run name or variant name (the latest complete one when several match)."""
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


def format_run_comparison(a: TrialRecord, b: TrialRecord, comparisons: Sequence[RunComparison]) -> str:
    """What ``ser tables --compare`` prints: the runs, the per-pair scores, one verdict line per comparison."""
    out = [f"A = {a.run_name or a.run_id} (run {a.run_id}), B = {b.run_name or b.run_id} (run {b.run_id}); "
           f"protocol {a.params.get('protocol', '?')}"]
    for note in dict.fromkeys(n for c in comparisons for n in c.notes):
        out.append(f"note: {note}")
    for c in comparisons:
        r, by_seed = c.result, c.pairing != "folds"
        how = "per (fold, seed)" if by_seed else "per fold (mean over its seeds)"
        out += ["", f"test {c.metric.split('_')[1].upper()}, paired {how}:",
                "fold  seed  A      B      A-B" if by_seed else "fold  A      B      A-B"]
        for (fold, seed), va, vb in zip(r.keys, r.a, r.b):
            cells = [f"{fold:<4}"] + ([f"{seed:<4}"] if by_seed else [])
            out.append("  ".join(cells + [f"{va:.3f}", f"{vb:.3f}", f"{va - vb:+.3f}"]))
        out.append(c.line())
        if r.wilcoxon_note:
            out.append(f"(Wilcoxon not run: {r.wilcoxon_note})")
    out += ["", f"verdicts: 'beyond noise' needs the {100 * comparisons[0].result.confidence:g}% bootstrap interval "
                f"to exclude 0 and the paired t-test to reject; see ser_platform/comparison.py"] if comparisons else []
    return "\n".join(out)


def compare_runs(client: Any, experiment_id: str, ref_a: str, ref_b: str) -> str:
    """``ser tables --compare A B``: both runs resolved, compared on test UA and WA, formatted."""
    a = resolve_trial_run(client, experiment_id, ref_a)
    b = resolve_trial_run(client, experiment_id, ref_b)
    return format_run_comparison(a, b, compare_records(client, a, b, label_a="A", label_b="B"))


def _comparison_notes(client: Any, table: "Table", sweep: SweepRecord, pairs: Sequence[tuple[str, str]],
                      key: str) -> list[str]:
    """Notes under a table: the paired comparison (test UA and WA, by fold) of each pair of its rows, named by
    the value of ``table.data[key]`` ("A"/"B"/"C" in Table 1, the variant in Table 4)."""
    by_id = {t.run_id: t for t in sweep.trials}
    rows = dict(zip(table.data[key], table.data["run_id"]))
    notes = []
    for name_a, name_b in pairs:
        a, b = by_id.get(rows.get(name_a) or ""), by_id.get(rows.get(name_b) or "")
        if a is None or b is None:
            notes.append(f"{name_a} vs {name_b}: not compared ({name_a if a is None else name_b} has no complete run)")
            continue
        try:
            comparisons = compare_records(client, a, b, label_a=name_a, label_b=name_b, pairings=("folds",))
        except TablesError as error:
            notes.append(f"{name_a} vs {name_b}: not compared: {error}")
            continue
        notes += [c.line() for c in comparisons]
    return notes


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


def latest_tables(sweeps: Sequence[SweepRecord],
                  client: Any | None = None) -> list[tuple[SweepRecord, Table, list[str]]]:
    """For each table, the most recent sweep that has trials for it (with ``client``, its paired comparisons) and
    the names of the older sweeps that also have it."""
    slugs = {s.run_id: [t.slug for t in sweep_tables(s)] for s in sweeps}  # built once, without fold histories
    having: dict[str, list[SweepRecord]] = {}
    for sweep in sweeps:  # oldest first: the last one with a table is the one shown
        for slug in slugs[sweep.run_id]:
            having.setdefault(slug, []).append(sweep)
    chosen = {slug: found[-1] for slug, found in having.items()}
    out = []
    for sweep in {s.run_id: s for s in chosen.values()}.values():  # comparisons read fold histories: only these
        out += [(sweep, t, [s.name for s in having[t.slug][:-1]])
                for t in sweep_tables(sweep, client) if chosen.get(t.slug) is sweep]
    return sorted(out, key=lambda item: item[1].slug)


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
        print(compare_runs(client, experiment_id, compare[0], compare[1]))
        return 0
    sweeps = collect_sweeps(client, experiment_id)
    shown = latest_tables(sweeps, client)
    if not shown:
        raise TablesError(f"experiment {experiment!r} at {uri} has no sweep with trial runs; run experiments/"
                          f"sweep_loss_weights.py, ablation.py, embedding_space.py or compare_models.py first")
    for sweep, table, older in shown:
        print(format_table(table))
        if older:
            print(f"(older sweeps with this table, not shown: {', '.join(older)})")
        print()
        log_tables(client, sweep.run_id, [table])
    print(f"logged on the parent runs under artifacts/tables/ (experiment {experiment!r}, {uri})",
          file=sys.stderr)
    return 0
