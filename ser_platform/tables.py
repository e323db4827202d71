"""The paper's Tables 1-4 (of Table 4 its runnable part), generated from logged MLflow runs (never hand-typed) by
one builder driven by the catalogue, and paired comparisons of trial runs.

A sweep's parent run names its catalogue experiment (tag ``ser.kind``); :func:`build_table` lays out that
experiment's table from the sweep's trial runs (``tracking.records``):

* a grid experiment: one row per catalogue row, filled by the latest *complete* trial (FINISHED with every
  configured fold scored) whose ``variant`` is the row's label; the others are listed under the table;
* the Optuna search: every complete trial, best objective first.

Every table says which text its runs' text network read (``data.train_text_source`` for training and validation,
``data.test_text_source`` for the test split: gold transcripts or an ASR track, ``data/transcripts.py``): a
column ("train → test") and its caption; runs logged before those keys existed read gold. A table whose
experiment asks for it (``Experiment.text_scores``, Table 5) also shows each row's WER and scripted overlap,
computed from the dataset's tracks (``transcripts.run_text_scores``) where the dataset can be read.

A table never mixes protocols: the protocol is a column, a sweep run under several gives one table per protocol,
and a table built from runs of two protocols raises ``TablesError``. Paired comparisons (under Tables 1 and 4, and
``ser tables --compare``) read the trials' per-fold series and hand them to ``comparison.paired_comparison``,
which owns the statistics.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ser_platform.catalogue import EXPERIMENTS, PAPER_GRID, PAPER_GRID_SPACE, Experiment
from ser_platform.comparison import PairedComparison, format_comparison, paired_comparison
from ser_platform.data.transcripts import ASR, GOLD, run_text_scores, track_ref
from ser_platform.tracking import (SweepRecord, TrialRecord, collect_sweeps, existing_experiment_id,
                                   find_trial, fold_scores, latest_complete, log_table_artifacts, open_store,
                                   resolve_tracking_uri)
from ser_platform.tracking.runs import MlflowRun
from ser_platform.tracking.schema import FOLDS, SEARCH_VARIANT

PAPER_NOTE = "paper: IEMOCAP, 5,531 utterances, 4 classes; its WA/UA beside ours for reference only"
RESULT_HEADER = ["WA", "UA", "val UA", "protocol", "text (train → test)", "paper WA", "paper UA"]
SEARCH_RESULT_HEADER = ["val UA (objective)", "WA", "UA", "protocol", "text (train → test)", "paper WA", "paper UA"]
TEXT_SCORE_HEADER = ["test WER", "train WER", "scripted overlap"]


class TablesError(ValueError):
    """No runs where the tables were asked for, or runs that cannot share a table or a comparison; the message
    says where it looked and why."""


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
    search: bool = False  # an Optuna search's table (one row per trial)

    @property
    def slug(self) -> str:
        return f"table{self.number}" + ("_search" if self.search else "") + (f"_{self.protocol}" if self.split else "")


# --- cells ----------------------------------------------------------------------------------------------------

def _mean_std(record: TrialRecord | None, key: str) -> str:
    if record is None:
        return "—"
    return f"{record.metrics[f'{key}_mean']:.3f} ± {record.metrics.get(f'{key}_std', float('nan')):.3f}"


def text_source(record: TrialRecord, split: str) -> str:
    """The text a run's ``split`` ("train": training and validation, "test") read: ``gold`` or ``asr:NAME@REV``
    (``asr`` spelled out with ``data.asr_model``); runs logged before text sources existed read gold."""
    value = record.params.get(f"data.{split}_text_source", GOLD)
    ref = track_ref(value, record.params.get("data.asr_model", ""))
    return GOLD if ref is None else f"{ASR}:{ref}"


def _text(record: TrialRecord | None) -> str:
    return "—" if record is None else f"{text_source(record, 'train')} → {text_source(record, 'test')}"


_scores_cache: dict[tuple, dict[str, Any]] = {}  # (dataset, sources, protocol, folds) -> scores: read once


def _text_key(record: TrialRecord) -> tuple:
    p = record.params
    return (p.get("data.dataset", ""), p.get("data.train_text_source", GOLD), p.get("data.test_text_source", GOLD),
            p.get("data.asr_model", ""), record.protocol, p.get(FOLDS, ""))


def _text_scores(record: TrialRecord | None) -> list[str]:
    """Table 5's cells of a run: test and training-text WER, scripted overlap (``transcripts.run_text_scores`` on
    the run's dataset); "n/a" where the dataset or its track cannot be read here (``_text_score_notes`` says
    why)."""
    if record is None:
        return ["—"] * len(TEXT_SCORE_HEADER)
    key = _text_key(record)
    if key not in _scores_cache:
        try:
            _scores_cache[key] = run_text_scores(*key[:5], [int(f) for f in key[5].split(",") if f.strip()])
        except (ValueError, OSError) as err:  # DataError included: a dataset that is elsewhere, a track gone
            _scores_cache[key] = {"error": str(err).splitlines()[0]}
    scores = _scores_cache[key]
    if "error" in scores:
        return ["n/a"] * len(TEXT_SCORE_HEADER)
    percent = lambda v, gold="gold": gold if v is None else f"{100 * v:.1f} %"  # noqa: E731
    return [percent(scores["test_wer"]), percent(scores["train_wer"]), percent(scores["scripted_overlap"], "n/a")]


def _text_score_notes(picked: Sequence[tuple[TrialRecord | None, Any]]) -> list[str]:
    notes = []
    for record, _ in picked:
        scores = _scores_cache.get(_text_key(record)) if record is not None else None
        if scores and "error" in scores:
            notes.append(f"WER and overlap of {record.label} not computed here: {scores['error']}")
    return notes


def _paper(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _pending_state(records: Sequence[TrialRecord]) -> str:
    return "; ".join(r.state() for r in records) if records else "not run"


def _one_protocol(number: str, picked: Sequence[TrialRecord | None]) -> str:
    """The protocol shared by a table's runs; a table refuses runs of different protocols (their folds are other
    test sets, so their means are not comparable in one column)."""
    protocols = {r.protocol: r for r in picked if r is not None}
    if len(protocols) > 1:
        runs = ", ".join(f"{r.label}: {p}" for p, r in sorted(protocols.items()))
        raise TablesError(f"Table {number} would mix protocols ({runs}); build one table per protocol "
                          f"(sweep_tables does)")
    return next(iter(protocols), "")


def _caption(sweep: SweepRecord, records: Sequence[TrialRecord]) -> str:
    def values(key: str) -> str:
        seen = sorted({r.params.get(key, "?") for r in records})
        return ", ".join(seen) if seen else "?"

    dataset = ", ".join(Path(d).name or d for d in values("data.dataset").split(", "))
    texts = ", ".join(sorted({_text(r) for r in records})) or "?"
    seeds = sorted({int(r.params.get("train.seeds", "1")) for r in records}) or [1]  # absent: logged before seeds
    over = "the folds" if seeds == [1] else "the folds × seeds"
    count = "/".join(map(str, seeds)) + (" seed" if seeds == [1] else " seeds")
    return (f"Mean ± std over {over} of each configuration (one fold = one test session; {count}). "
            f"Protocol {values('protocol')}; folds {values('folds')}; training seed(s) {values('seed')}; "
            f"dataset {dataset}; preset {values('preset')}; epochs {values('train.epochs')}; metric loss on the "
            f"{values('loss.space')} embedding (loss.space); text read (training and validation → test; "
            f"data.train_text_source, data.test_text_source): {texts}; "
            f"model selection on {values('sweep.metric')} (validation speakers, never the test session). "
            f"Sweep '{sweep.name}' (MLflow run {sweep.run_id}). WA = accuracy, UA = mean per-class recall; "
            f"{PAPER_NOTE}.")


def _columns(picked: Sequence[tuple[TrialRecord | None, tuple[float, float] | None]]) -> dict[str, list[Any]]:
    """Numeric columns for the MLflow table artifact."""

    def metric(r: TrialRecord | None, key: str) -> float | None:
        return None if r is None else r.metrics.get(key)

    return {
        "run_id": [None if r is None else r.run_id for r, _ in picked],
        "wa_mean": [metric(r, "test_wa_mean") for r, _ in picked],
        "wa_std": [metric(r, "test_wa_std") for r, _ in picked],
        "ua_mean": [metric(r, "test_ua_mean") for r, _ in picked],
        "ua_std": [metric(r, "test_ua_std") for r, _ in picked],
        "val_ua_mean": [metric(r, "val_ua_mean") for r, _ in picked],
        "text_train": [None if r is None else text_source(r, "train") for r, _ in picked],
        "text_test": [None if r is None else text_source(r, "test") for r, _ in picked],
        "paper_wa": [None if p is None else p[0] for _, p in picked],
        "paper_ua": [None if p is None else p[1] for _, p in picked],
    }


def _excluded(records: Sequence[TrialRecord], used: set[str]) -> list[str]:
    return [f"excluded: trial run {r.label} ({r.state()})" for r in records if r.run_id not in used and not r.complete]


# --- the builder ------------------------------------------------------------------------------------------------

def _grid_rows(experiment: Experiment, records: Sequence[TrialRecord]) -> tuple[list[list[str]], list, set[str]]:
    rows, picked, used = [], [], set()
    for row in experiment.rows:
        matching = [r for r in records if r.variant == row.label]
        best = latest_complete(matching)
        if best is not None:
            used.add(best.run_id)
        wa, ua = row.paper or (None, None)
        rows.append([*row.cells, _mean_std(best, "test_wa"), _mean_std(best, "test_ua"),
                     _mean_std(best, "val_ua") if best else _pending_state(matching),
                     "—" if best is None else best.protocol, _text(best), _paper(wa), _paper(ua)]
                    + (_text_scores(best) if experiment.text_scores else []))
        picked.append((best, row.paper))
    return rows, picked, used


def paper_point(alpha: float, beta: float, space: str) -> tuple[float, float] | None:
    """The paper's (WA, UA) for a searched point that is one of its Table 2 rows (on the fused space)."""
    for row in PAPER_GRID.rows:
        if (space == PAPER_GRID_SPACE and abs(alpha - row.overrides["loss.alpha"]) < 1e-9
                and abs(beta - row.overrides["loss.beta"]) < 1e-9):
            return row.paper
    return None


def _search_rows(records: Sequence[TrialRecord], metric: str) -> tuple[list[list[str]], list, list[TrialRecord]]:
    complete = sorted((r for r in records if r.complete), key=lambda r: -r.metrics.get(metric, -math.inf))
    rows, picked = [], []
    for r in complete:
        alpha, beta, space = r.param_float("loss.alpha"), r.param_float("loss.beta"), r.params.get("loss.space", "?")
        paper = paper_point(alpha, beta, space)
        wa, ua = paper or (None, None)
        rows.append(["CE Loss" if alpha == 0 else "Joint Loss", f"{alpha:.3f}", f"{beta:.3f}",
                     f"{r.param_float('loss.margin'):.3f}", space, _mean_std(r, "val_ua"), _mean_std(r, "test_wa"),
                     _mean_std(r, "test_ua"), r.protocol, _text(r), _paper(wa), _paper(ua)])
        picked.append((r, paper))
    return rows, picked, complete


def build_table(experiment: Experiment, sweep: SweepRecord, *, metric: str = "val_ua_mean") -> Table:
    """The table of ``experiment`` from ``sweep``'s trial runs (module docstring); raises ``TablesError`` when
    they are of more than one protocol."""
    records = [t for t in sweep.trials if t.table == experiment.table
               and (t.variant == SEARCH_VARIANT) == experiment.is_search]
    if experiment.is_search:
        rows, picked, complete = _search_rows(records, metric)
        protocol = _one_protocol(experiment.table, complete)
        data = {"alpha": [r.param_float("loss.alpha") for r in complete],
                "beta": [r.param_float("loss.beta") for r in complete],
                "margin": [r.param_float("loss.margin") for r in complete],
                "space": [r.params.get("loss.space") for r in complete], **_columns(picked)}
        return Table(experiment.table, experiment.table_title, [*experiment.columns, *SEARCH_RESULT_HEADER], rows,
                     _caption(sweep, records), data, _excluded(records, set()), protocol, search=True)
    rows, picked, used = _grid_rows(experiment, records)
    protocol = _one_protocol(experiment.table, [r for r, _ in picked])
    data: dict[str, list[Any]] = {"variant": [row.label for row in experiment.rows]}
    for index, column in enumerate(experiment.columns):
        data[column] = [row.cells[index] for row in experiment.rows]
    for key in dict.fromkeys(k for row in experiment.rows for k in row.overrides):
        data[key] = [row.overrides.get(key) for row in experiment.rows]
    caption = _caption(sweep, records) + (f" {experiment.caption_note}" if experiment.caption_note else "")
    header = [*experiment.columns, *RESULT_HEADER] + (TEXT_SCORE_HEADER if experiment.text_scores else [])
    notes = _excluded(records, used) + (_text_score_notes(picked) if experiment.text_scores else [])
    return Table(experiment.table, experiment.table_title, header, rows, caption, {**data, **_columns(picked)},
                 notes, protocol)


def sweep_tables(sweep: SweepRecord, uri: str | None = None) -> list[Table]:
    """The tables of a sweep's experiment, one per protocol its trials ran under. With ``uri`` (a store to read
    the trials' per-fold series from) the experiment's pairs are compared under the table."""
    experiment = EXPERIMENTS.get(sweep.kind)
    if experiment is None:
        return []
    protocols = sorted({t.protocol for t in sweep.trials if t.table == experiment.table})
    tables = []
    for protocol in protocols:
        part = sweep.with_trials(tuple(t for t in sweep.trials if t.protocol == protocol))
        table = build_table(experiment, part)
        if len(protocols) > 1:
            table.title += f" — protocol {protocol}"
            table.split, table.protocol = True, protocol
        table.notes += _seed_spread_notes(table, sweep)
        if uri is not None and experiment.pairs:
            table.notes += _comparison_notes(uri, experiment, table, sweep)
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


def _comparison_notes(uri: str, experiment: Experiment, table: Table, sweep: SweepRecord) -> list[str]:
    """Notes under a table: the paired comparison (test UA and WA, by fold) of each of the experiment's pairs of
    rows, named by the rows' short names ("A"/"B"/"C" in Table 1, the label in Table 4)."""
    by_id = {t.run_id: t for t in sweep.trials}
    picked = dict(zip(table.data["variant"], table.data["run_id"]))
    notes = []
    for label_a, label_b in experiment.pairs:
        row_a, row_b = experiment.row(label_a), experiment.row(label_b)
        a, b = by_id.get(picked.get(label_a) or ""), by_id.get(picked.get(label_b) or "")
        if a is None or b is None:
            missing = row_a.name if a is None else row_b.name
            notes.append(f"{row_a.name} vs {row_b.name}: not compared ({missing} has no complete run)")
            continue
        try:
            comparisons = compare_records(uri, a, b, label_a=row_a.name, label_b=row_b.name, pairings=("folds",))
        except TablesError as error:
            notes.append(f"{row_a.name} vs {row_b.name}: not compared: {error}")
            continue
        notes += [c.line() for c in comparisons]
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


def log_tables(run: MlflowRun, tables: Sequence[Table]) -> list[str]:
    """Log each table on the sweep's parent run as an MLflow table artifact and as markdown; return the paths."""
    paths = []
    for table in tables:
        paths += log_table_artifacts(run, table.slug, table.data, table_markdown(table))
    return paths


# --- paired comparison of two trial runs (the statistics are ser_platform.comparison's) ------------------------

# Params that must agree for two runs' folds to be the same test sets: the folds of loso5 and loso10 are other
# speakers, a score on improvised utterances only is not paired with one on all of them, and a score on recognised
# test text is not paired with one on gold (or another recogniser's) text: the same utterances, other inputs. The
# training text may differ: that is a difference between two models, scored on the same inputs.
MUST_MATCH = ("protocol", "data.eval_subset", "data.test_text_source")


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


def _matched(record: TrialRecord, key: str) -> str:
    return text_source(record, "test") if key == "data.test_text_source" else record.params.get(key, "?")


def _refuse_other_test_sets(a: TrialRecord, b: TrialRecord, label_a: str, label_b: str) -> None:
    for key in MUST_MATCH:
        va, vb = _matched(a, key), _matched(b, key)
        if va != vb:
            what = "test inputs" if key == "data.test_text_source" else "test sets"
            raise TablesError(f"{label_a} ({a.label}) has {key}={va}, {label_b} ({b.label}) has {key}={vb}: their "
                              f"folds are not the same {what}, so they are not compared")


def compare_records(uri: str, a: TrialRecord, b: TrialRecord, *, label_a: str, label_b: str,
                    metrics: Sequence[str] = ("test_ua", "test_wa"), pairings: Sequence[str] | None = None,
                    n_boot: int = 10_000, seed: int = 0) -> list[RunComparison]:
    """Paired comparisons (``comparison.paired_comparison``) of two complete trial runs, A − B.

    Refuses (``TablesError``) runs whose test sets differ (``MUST_MATCH``: protocol, evaluation subset, test text) or whose
    folds differ. ``pairings``: "folds" (one score per fold, the mean over its seeds: the stricter test) and, when
    both runs have the same several seeds, also "folds x seeds"; by default both where they apply."""
    _refuse_other_test_sets(a, b, label_a, label_b)
    seeds_a, seeds_b = a.seeds(), b.seeds()
    notes = []
    if seeds_a != seeds_b:
        notes.append(f"seeds differ ({label_a}: {seeds_a or [a.params.get('seed', '?')]}, {label_b}: "
                     f"{seeds_b or [b.params.get('seed', '?')]}): paired by fold on each fold's seed mean")
    if a.params.get("data.dataset") != b.params.get("data.dataset"):
        notes.append(f"datasets differ ({a.params.get('data.dataset')} vs {b.params.get('data.dataset')})")
    available = ["folds"] + (["folds x seeds"] if seeds_a and seeds_a == seeds_b else [])
    out = []
    for metric in metrics:
        for pairing in [p for p in (pairings or available) if p in available]:
            by_seed = pairing == "folds x seeds"
            sa, sb = (fold_scores(uri, r, metric, by_seed=by_seed) for r in (a, b))
            folds_a, folds_b = {f for f, _ in sa}, {f for f, _ in sb}
            if folds_a != folds_b:
                raise TablesError(f"{label_a} and {label_b} were scored on different folds ({label_a}: "
                                  f"{sorted(folds_a)}, {label_b}: {sorted(folds_b)}); a paired comparison needs "
                                  f"the same folds")
            out.append(RunComparison(metric, label_a, label_b, pairing,
                                     paired_comparison(sa, sb, n_boot=n_boot, seed=seed), tuple(notes)))
    return out


def resolve_trial_run(uri: str, experiment_id: str, ref: str) -> TrialRecord:
    """A complete trial run by run id, run name or variant name (the latest complete one when several match)."""
    found = find_trial(uri, experiment_id, ref)
    if found is None:
        raise TablesError(f"no complete trial run with id, name or variant {ref!r} in experiment {experiment_id}")
    return found


def format_run_comparison(a: TrialRecord, b: TrialRecord, comparisons: Sequence[RunComparison]) -> str:
    """What ``ser tables --compare`` prints: the runs, the per-pair scores, one verdict line per comparison."""
    out = [f"A = {a.label} (run {a.run_id}), B = {b.label} (run {b.run_id}); protocol {a.protocol}"]
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


def compare_runs(uri: str, experiment_id: str, ref_a: str, ref_b: str) -> str:
    """``ser tables --compare A B``: both runs resolved, compared on test UA and WA, formatted."""
    a = resolve_trial_run(uri, experiment_id, ref_a)
    b = resolve_trial_run(uri, experiment_id, ref_b)
    return format_run_comparison(a, b, compare_records(uri, a, b, label_a="A", label_b="B"))


# --- the command --------------------------------------------------------------------------------------------------

def latest_tables(sweeps: Sequence[SweepRecord], uri: str | None = None) -> list[tuple[SweepRecord, Table, list[str]]]:
    """For each table, the most recent sweep that has trials for it (with ``uri``, its paired comparisons) and
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
                for t in sweep_tables(sweep, uri) if chosen.get(t.slug) is sweep]
    return sorted(out, key=lambda item: item[1].slug)


def tables_command(*, experiment: str, mlflow_uri: str | None = None, compare: Sequence[str] | None = None) -> int:
    """``ser tables``: print Tables 1-4 of an MLflow experiment and log them on their sweeps' parent runs."""
    uri = open_store(resolve_tracking_uri(cli_value=mlflow_uri))
    experiment_id = existing_experiment_id(uri, experiment)
    if compare:
        if len(compare) != 2:
            raise TablesError(f"--compare takes two runs, got {list(compare)}")
        print(compare_runs(uri, experiment_id, compare[0], compare[1]))
        return 0
    shown = latest_tables(collect_sweeps(uri, experiment_id), uri)
    if not shown:
        raise TablesError(f"experiment {experiment!r} at {uri} has no sweep with trial runs; run experiments/"
                          f"sweep_loss_weights.py, ablation.py, embedding_space.py or compare_models.py first")
    for sweep, table, older in shown:
        print(format_table(table))
        if older:
            print(f"(older sweeps with this table, not shown: {', '.join(older)})")
        print()
        log_tables(MlflowRun(uri, sweep.run_id), [table])
    print(f"logged on the parent runs under artifacts/tables/ (experiment {experiment!r}, {uri})", file=sys.stderr)
    return 0

