"""Tables 1-3 and paired comparisons, built from MLflow runs logged by the sweep's own logging functions.

No Ray: each test logs a sweep's parent and trial runs into a fresh SQLite store with known per-fold numbers,
then checks what the tables show against numpy on those numbers, and the paired tests against hand formulas
and a brute-force enumeration of sign flips.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
from mlflow import MlflowClient

from ser_platform import cli, tracking
from ser_platform.catalogue import ABLATION, EMBEDDING_SPACE, EXPERIMENTS, SEARCH
from ser_platform.config import load_config
from ser_platform.sweep import TrialContext
from ser_platform.tables import (TablesError, build_table, format_table, log_tables, sweep_tables, table_markdown,
                                 tables_command)
from ser_platform.tracking import collect_sweeps, ensure_store, experiment_id

from support import copy_with_track, log_trial, open_sweep

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
        return open_sweep(self.uri, self.experiment_id, experiment, name, self.config)

    def trial(self, ctx: TrialContext, trial_id: str, params: dict, scores: dict[int, float] | None,
              status: str | None = None) -> str:
        """Log one trial; ``scores=None`` leaves it unfinished (``status`` then sets its state)."""
        return log_trial(ctx, trial_id, params, self.config, None if scores is None else fold_result(scores), status)


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
    [sweep] = collect_sweeps(store.uri, store.experiment_id)
    [table] = sweep_tables(sweep)
    assert table.number == "1"
    for row, catalogue_row in zip(table.rows, ABLATION.rows):
        (letter, method), (paper_wa, paper_ua), variant = catalogue_row.cells, catalogue_row.paper, catalogue_row.label
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
    for i, row in enumerate(EMBEDDING_SPACE.rows):
        store.trial(spaces, f"s{i}", {"variant": row.label}, scores_for(0.01 * i))
    search = store.sweep(SEARCH, "search")
    points = [{"loss.alpha": 0.5, "loss.beta": 1.0, "loss.margin": 0.3, "loss.space": "fused"},
              {"loss.alpha": 0.9, "loss.beta": 0.4, "loss.margin": 1.2, "loss.space": "text"}]
    store.trial(search, "o1", points[0], scores_for(-0.05))
    store.trial(search, "o2", points[1], scores_for(0.08))
    store.trial(search, "o3", {**points[1], "loss.alpha": 0.2}, None)  # still running: not in the table
    sweeps = {s.name: s for s in collect_sweeps(store.uri, store.experiment_id)}
    [table3] = sweep_tables(sweeps["spaces"])
    assert [row[0] for row in table3.rows] == [row.cells[0] for row in EMBEDDING_SPACE.rows]
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
    [table] = sweep_tables(collect_sweeps(store.uri, store.experiment_id)[0])
    paths = log_tables(tracking.MlflowRun(store.uri, ctx.parent_run_id), [table])
    assert paths == ["tables/table1.json", "tables/table1.md"]
    markdown = Path(store.client.download_artifacts(ctx.parent_run_id, "tables/table1.md", str(tmp_path)))
    assert markdown.read_text() == table_markdown(table)
    frame = store.client.load_table(store.experiment_id, "tables/table1.json", run_ids=[ctx.parent_run_id])
    assert frame["ua_mean"].tolist() == pytest.approx([np.mean(list(scores_for(0.02 * i).values()))
                                                       for i in range(3)])
    assert frame["paper_ua"].tolist() == [row.paper[1] for row in ABLATION.rows]


def test_ser_tables_command(store, capsys, tmp_path):
    ctx = store.sweep(EMBEDDING_SPACE, "cli")
    for i, space in enumerate(EMBEDDING_SPACE.variants):
        store.trial(ctx, f"t{i}", {"variant": space}, scores_for(0.01 * i))
    assert cli.main(["tables", "--mlflow-experiment", store.experiment, "--mlflow-uri", store.uri]) == 0
    out = capsys.readouterr().out
    assert "Table 3: where the metric loss is applied" in out and "Speech Embedding" in out
    artifacts = [a.path for a in store.client.list_artifacts(ctx.parent_run_id, "tables")]
    assert artifacts == ["tables/table3.json", "tables/table3.md"]

    assert cli.main(["tables", "--mlflow-experiment", "nope", "--mlflow-uri", store.uri]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err
    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert cli.main(["tables", "--mlflow-experiment", store.experiment, "--mlflow-uri", f"sqlite:///{missing}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not missing.exists()  # not created empty


def test_ser_tables_compare_by_variant_name(store, capsys):
    ctx = store.sweep(ABLATION, "compare")
    a_scores = scores_for(0.05)
    b_scores = {f: v - 0.01 * f - 0.004 * (f % 2) for f, v in a_scores.items()}
    store.trial(ctx, "a", {"variant": "Full model"}, a_scores)
    store.trial(ctx, "b", {"variant": "without FA"}, b_scores)
    assert cli.main(["tables", "--mlflow-experiment", store.experiment, "--mlflow-uri", store.uri,
                     "--compare", "Full model", "without FA"]) == 0
    out = capsys.readouterr().out
    assert "A = Full model [a]" in out and "B = without FA [b]" in out and "protocol loso5" in out
    a, b = np.array([a_scores[f] for f in FOLDS]), np.array([b_scores[f] for f in FOLDS])
    t = scipy.stats.ttest_rel(a, b)
    # test UA per fold: the scores themselves, then the verdict line with scipy's p and the mean difference.
    for f in FOLDS:
        assert f"{f:<4}  {a_scores[f]:.3f}  {b_scores[f]:.3f}  {a_scores[f] - b_scores[f]:+.3f}" in out
    ua_line = next(line for line in out.splitlines() if line.startswith("test UA: A"))
    assert f"= +{100 * (a - b).mean():.2f} points" in ua_line and f"paired t p={t.pvalue:.2g}" in ua_line
    assert "n=5" in ua_line and "[per fold]" in ua_line
    # test WA is logged as UA + 0.03 in every fold: the same differences.
    wa_line = next(line for line in out.splitlines() if line.startswith("test WA: A"))
    assert f"paired t p={t.pvalue:.2g}" in wa_line


def test_table1_carries_a_vs_b_and_a_vs_c(store):
    ctx = store.sweep(ABLATION, "paired")
    full = scores_for(0.06)
    without_fa = {f: v - 0.02 - 0.003 * f for f, v in full.items()}  # behind in every fold: beyond noise
    without_metric = {f: v + (0.01 if f % 2 else -0.012) for f, v in full.items()}  # either way: within noise
    for i, (variant, scores) in enumerate((("Full model", full), ("without FA", without_fa),
                                           ("without metric loss", without_metric))):
        store.trial(ctx, f"t{i}", {"variant": variant}, scores)
    [sweep] = collect_sweeps(store.uri, store.experiment_id)
    [plain] = sweep_tables(sweep)
    assert not any(" vs " in n or "A − B" in n for n in plain.notes)  # no client: no fold histories read
    [table] = sweep_tables(sweep, store.uri)
    lines = [n for n in table.notes if n.startswith("test UA: ")]
    assert [line.split(" = ")[0] for line in lines] == ["test UA: A − B", "test UA: A − C"]
    for line, other, verdict in zip(lines, (without_fa, without_metric), ("beyond noise", "within noise")):
        a, b = np.array([full[f] for f in FOLDS]), np.array([other[f] for f in FOLDS])
        assert f"paired t p={scipy.stats.ttest_rel(a, b).pvalue:.2g}" in line
        assert line.endswith(f"{verdict} [per fold]")
    markdown = table_markdown(table)
    assert all(f"- {line}" in markdown for line in lines)


def test_a_table_has_one_protocol(store):
    ctx = store.sweep(EMBEDDING_SPACE, "protocols")
    for i, space in enumerate(EMBEDDING_SPACE.variants):
        store.trial(ctx, f"t{i}", {"variant": space}, scores_for(0.01 * i))
    store.config = store.config.replace({"data.protocol": "session5", "data.folds": (1,)})
    store.trial(ctx, "s", {"variant": "speech"}, {1: 0.7})
    [sweep] = collect_sweeps(store.uri, store.experiment_id)
    tables = sweep_tables(sweep)
    assert [(t.slug, t.protocol) for t in tables] == [("table3_loso5", "loso5"), ("table3_session5", "session5")]
    column = tables[0].header.index("protocol")
    assert [row[column] for row in tables[0].rows] == ["loso5"] * 3
    assert [row[column] for row in tables[1].rows] == ["—", "session5", "—"]
    assert tables[1].rows[1][2] == "0.700 ± 0.000" and "protocol session5" in tables[1].title
    # Built directly from the mixed sweep, a table refuses.
    with pytest.raises(TablesError, match=r"would mix protocols \(.*loso5, .*session5\)"):
        build_table(EMBEDDING_SPACE, sweep)  # the latest "speech" run is session5's, the others loso5's


def test_compare_refuses_other_protocols_and_other_folds(store):
    ctx = store.sweep(ABLATION, "refuse")
    store.trial(ctx, "a", {"variant": "Full model"}, scores_for(0.0))
    store.trial(ctx, "b", {"variant": "without FA"}, {f: v for f, v in scores_for(0.0).items() if f != 5})
    config = store.config
    store.config = config.replace({"data.protocol": "loso10"})
    store.trial(ctx, "c", {"variant": "without metric loss"}, scores_for(0.0))
    args = ["tables", "--mlflow-experiment", store.experiment, "--mlflow-uri", store.uri, "--compare"]
    with pytest.raises(TablesError, match="protocol=loso5.*protocol=loso10"):
        tables_command(experiment=store.experiment, mlflow_uri=store.uri, compare=["Full model", "without metric loss"])
    assert cli.main(args + ["Full model", "without metric loss"]) == 2
    # "without FA" logged 4 of 5 folds: not complete, so not a candidate at all.
    with pytest.raises(TablesError, match="no complete trial run .*'without FA'"):
        tables_command(experiment=store.experiment, mlflow_uri=store.uri, compare=["Full model", "without FA"])


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS.values() if not e.is_search], ids=lambda e: e.key)
def test_every_catalogue_row_finds_the_run_its_trial_logged(store, experiment):
    """The Tune grid and the table come from the same catalogue rows: a run logged for each row (as a grid trial
    logs it) fills that row, none reads "not run"."""
    config = store.config.replace(experiment.defaults)
    ctx = open_sweep(store.uri, store.experiment_id, experiment, f"every-{experiment.key}", config)
    for i, row in enumerate(experiment.rows):
        log_trial(ctx, f"t{i}", {"variant": row.label}, config, fold_result(scores_for(0.01 * i)))
    [table] = sweep_tables(collect_sweeps(store.uri, store.experiment_id, ctx.parent_run_id)[0])
    assert table.number == experiment.table and len(table.rows) == len(experiment.rows)
    ua = table.header.index("UA")
    for i, (row, cells) in enumerate(zip(experiment.rows, table.rows)):
        assert cells[:len(row.cells)] == list(row.cells)
        assert cells[ua] == mean_std(scores_for(0.01 * i)), row.label
    assert not any("not run" in cell for cells in table.rows for cell in cells)
    spaces = sorted({config.replace(row.overrides).loss.space for row in experiment.rows})
    assert f"metric loss on the {', '.join(spaces)} embedding (loss.space)" in table.caption  # which space, said


@pytest.mark.parametrize("experiment", [SEARCH, ABLATION], ids=lambda e: e.key)
def test_parent_and_trials_carry_the_same_ui_keys_and_the_parent_no_varied_value(store, experiment):
    from ser_platform.tracking.schema import LABELS

    ctx = store.sweep(experiment, f"labels-{experiment.key}")
    params = ({"loss.alpha": 0.9, "loss.beta": 0.4, "loss.margin": 1.2, "loss.space": "text"} if experiment.is_search
              else {"variant": "without FA"})
    run_id = store.trial(ctx, "t1", params, scores_for(0.0))
    parent, trial = (store.client.get_run(r).data.params for r in (ctx.parent_run_id, run_id))
    for key in LABELS:
        assert key in parent and key in trial, key
    assert parent["table"] == trial["table"] == experiment.table
    assert (parent["protocol"], parent["folds"], parent["seeds"]) == (trial["protocol"], trial["folds"], trial["seeds"])
    assert parent["variant"] == ("search" if experiment.is_search else "rows: Full model; without FA; without metric loss")
    assert trial["variant"] == ("search" if experiment.is_search else "without FA")
    # What the trials vary is not logged on the parent as if the sweep had run with the base config's value.
    assert experiment.varied_keys and not set(experiment.varied_keys) & set(parent)
    assert all(trial[key] == parent[key] for key in ("loss.miner", "train.lr", "data.protocol"))


@pytest.fixture(scope="module")
def asr_dataset(training_dataset, tmp_path_factory):
    """(dataset copy, gold columns, texts) with a hand-made track ``fake@r1``: every gold text without its last
    word, its metadata the WER report ``ser transcribe`` stores."""
    from ser_platform.data.transcripts import wer_report, word_errors

    return copy_with_track(training_dataset, tmp_path_factory.mktemp("asr_tables") / "parquet",
                           lambda text, row_id: " ".join(text.split()[:-1]),
                           lambda gold, texts: {"wer": wer_report(gold, word_errors(gold["transcript"], texts))})


def test_table5_shows_text_sources_wer_and_refuses_to_pair_other_test_text(store, asr_dataset):
    import jiwer

    from ser_platform.catalogue import ASR_TEXT
    from ser_platform.data.folds import all_folds
    from ser_platform.data.overlap import normalise_transcript, transcript_overlap

    dataset, gold, heard = asr_dataset
    store.config = store.config.replace({**ASR_TEXT.defaults, "data.dataset": str(dataset),
                                         "data.asr_model": "fake@r1"})
    ctx = store.sweep(ASR_TEXT, "asr")
    offsets = {"gold text": 0.1, "train gold, test ASR": 0.0, "train ASR, test ASR": 0.03}
    for i, (variant, offset) in enumerate(offsets.items()):
        store.trial(ctx, f"t{i}", {"variant": variant}, scores_for(offset))
    [table] = sweep_tables(collect_sweeps(store.uri, store.experiment_id)[0], store.uri)
    column = {name: [row[table.header.index(name)] for row in table.rows]
              for name in ("text (train → test)", "test WER", "train WER", "scripted overlap")}
    assert column["text (train → test)"] == ["gold → gold", "gold → asr:fake@r1", "asr:fake@r1 → asr:fake@r1"]
    refs, hyps = [normalise_transcript(t) for t in gold["transcript"]], [normalise_transcript(t) for t in heard]

    def mean_wer(side: str) -> str:  # jiwer over each fold's utterances, then the mean over the folds
        values = []
        for spec in all_folds("loso5"):
            speakers = spec.test_speakers if side == "test" else spec.train_speakers | spec.val_speakers
            keep = [i for i, s in enumerate(gold["speaker"]) if s in speakers]
            values.append(jiwer.wer([refs[i] for i in keep], [hyps[i] for i in keep]))
        return f"{100 * np.mean(values):.1f} %"

    assert column["test WER"] == ["gold", mean_wer("test"), mean_wer("test")]
    assert column["train WER"] == ["gold", "gold", mean_wer("train")]
    gold_share = transcript_overlap(gold, "loso5")["mean"]["scripted_overlap_share"]
    assert column["scripted overlap"][0] == f"{100 * gold_share:.1f} %"
    assert "data.train_text_source, data.test_text_source" in table.caption and "asr:fake@r1" in table.caption
    # The one paired comparison: the two rows that read the same (recognised) test text.
    assert [n.split(" = ")[0] for n in table.notes if n.startswith("test UA: ")] == \
        ["test UA: train ASR, test ASR − train gold, test ASR"]
    with pytest.raises(TablesError, match="data.test_text_source=gold.*data.test_text_source=asr:fake@r1.*not "
                                          "the same test inputs"):
        tables_command(experiment=store.experiment, mlflow_uri=store.uri,
                       compare=["gold text", "train gold, test ASR"])
