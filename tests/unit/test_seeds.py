"""``train.seeds``: a configuration's folds repeated over seeds seed, seed+1, ...

Truths: numpy over the (fold, seed) scores for the summary (mean ± sample std over every fold × seed run) and the
per-fold spread over seeds; the trial's logged series (fold means, every (fold, seed) score); the tables' caption
("1 seed" / "3 seeds") and the per-fold spread under a table; the flags; and one real Ray Train run with two seeds
(two Train runs ``.../seed=S``, a fold run per (fold, seed) each holding its model).
"""

from __future__ import annotations

import numpy as np
import pytest

from ser_platform.catalogue import COMPARE_MODELS
from ser_platform.config import ConfigError, load_config
from ser_platform.tables import format_table, sweep_tables
from ser_platform.tracking import collect_sweeps, ensure_store, experiment_id, trial_metrics
from ser_platform.train import FoldResult, TrialResult, summarize_trial

from support import log_trial, open_sweep

FOLDS, SEEDS = (1, 2, 3), (4, 5, 6)


def score(fold: int, seed: int, variant: float = 0.0) -> float:
    return 0.5 + variant + 0.03 * fold + 0.011 * ((seed * 7 + fold * 3) % 5)


def fold_result(fold: int, ua: float) -> FoldResult:
    return FoldResult(fold=fold, best_epoch=2, val_wa=ua + 0.02, val_ua=ua + 0.01, test_wa=ua + 0.03, test_ua=ua,
                      confusion=[[1]])


def trial_result(variant: float = 0.0, seeds=SEEDS) -> TrialResult:
    per_seed = {s: {f: fold_result(f, score(f, s, variant)) for f in FOLDS} for s in seeds}
    return TrialResult(per_fold=per_seed[seeds[0]], summary=summarize_trial(per_seed[seeds[0]], per_seed),
                       per_seed=per_seed)


def test_the_summary_is_over_folds_times_seeds_with_the_spread_over_seeds_per_fold():
    result = trial_result()
    every = np.array([score(f, s) for s in SEEDS for f in FOLDS])
    s = result.summary
    assert s["num_folds"] == 3 and s["num_seeds"] == 3
    assert s["test_ua_mean"] == pytest.approx(every.mean()) and s["test_ua_std"] == pytest.approx(every.std(ddof=1))
    assert s["test_wa_mean"] == pytest.approx(every.mean() + 0.03)
    spreads = [np.std([score(f, seed) for seed in SEEDS], ddof=1) for f in FOLDS]
    for fold, spread in zip(FOLDS, spreads):
        assert s[f"test_ua_seed_std_fold{fold}"] == pytest.approx(spread)
    assert s["test_ua_seed_std"] == pytest.approx(np.mean(spreads))
    assert set(result.runs()) == {(f, seed) for f in FOLDS for seed in SEEDS}


def test_one_seed_summarises_exactly_as_before():
    per_fold = {f: fold_result(f, score(f, 0)) for f in FOLDS}
    plain, with_seed = summarize_trial(per_fold), summarize_trial(per_fold, {0: per_fold})
    assert plain == with_seed and plain["num_seeds"] == 1 and "test_ua_seed_std" not in plain
    values = [score(f, 0) for f in FOLDS]
    assert plain["test_ua_std"] == pytest.approx(np.std(values, ddof=1))


def test_the_trial_logs_fold_means_over_seeds_and_every_fold_seed_score():
    summary, series = trial_metrics(trial_result())
    assert summary["folds_completed"] == 3
    for fold in FOLDS:
        assert series["fold_test_ua"][fold] == pytest.approx(np.mean([score(fold, s) for s in SEEDS]))
        for seed in SEEDS:
            assert series[f"fold_test_ua.seed{seed}"][fold] == pytest.approx(score(fold, seed))
    # One seed: the series are the fold scores themselves, no per-seed keys.
    _, single = trial_metrics(trial_result(seeds=(0,)))
    assert single["fold_test_ua"] == {f: score(f, 0) for f in FOLDS} and not any(".seed" in k for k in single)


@pytest.mark.slow
def test_tables_say_how_many_seeds_and_show_the_spread_per_fold(tmp_path):
    uri = ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = experiment_id(uri, "seeds")
    tables = {}
    for name, seeds in (("one-seed", (0,)), ("three-seeds", SEEDS)):
        config = load_config("demo", overrides={"data.dataset": "/data/x.parquet", "tracking.mlflow_uri": uri,
                                                "tracking.experiment": "seeds", "data.folds": FOLDS,
                                                "train.seed": seeds[0], "train.seeds": len(seeds),
                                                **COMPARE_MODELS.defaults})
        ctx = open_sweep(uri, exp, COMPARE_MODELS, name, config)
        for i, variant in enumerate(COMPARE_MODELS.variants):
            log_trial(ctx, f"t{i}", {"variant": variant}, config, trial_result(0.02 * i, seeds))
        [sweep] = collect_sweeps(uri, exp, ctx.parent_run_id)
        [tables[name]] = sweep_tables(sweep)
    one, three = tables["one-seed"], tables["three-seeds"]
    assert one.number == three.number == "4"
    assert "(one fold = one test session; 1 seed)" in one.caption and "folds × seeds" not in one.caption
    assert "Mean ± std over the folds × seeds" in three.caption and "3 seeds" in three.caption
    assert not any("spread over" in n for n in one.notes)
    spread = [n for n in three.notes if n.startswith("spread over 3 seeds, Full model")]
    expected = [np.std([score(f, s, 0.08) for s in SEEDS], ddof=1) for f in FOLDS]
    assert spread == ["spread over 3 seeds, Full model: std of test UA within a fold: "
                      + ", ".join(f"fold {f} {v:.3f}" for f, v in zip(FOLDS, expected))
                      + f" (mean {np.mean(expected):.3f})"]
    full = three.rows[-1]
    every = np.array([score(f, s, 0.08) for s in SEEDS for f in FOLDS])
    assert full[2] == f"{every.mean():.3f} ± {every.std(ddof=1):.3f}"
    assert "3 seeds" in format_table(three)


@pytest.mark.slow
def test_paired_comparison_pairs_fold_seed_runs_and_fold_means(tmp_path):
    """``--compare`` of two 3-seed runs: per (fold, seed), 9 pairs, and per fold on the seed means, 3 pairs; both
    against scipy's paired t-test on the numbers logged. Table 4 carries the full model against each baseline."""
    import scipy.stats

    from ser_platform.tables import compare_records, format_run_comparison

    uri = ensure_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = experiment_id(uri, "compare-seeds")
    config = load_config("demo", overrides={"data.dataset": "/data/x.parquet", "tracking.mlflow_uri": uri,
                                            "tracking.experiment": "compare-seeds", "data.folds": FOLDS,
                                            "train.seed": SEEDS[0], "train.seeds": len(SEEDS),
                                            **COMPARE_MODELS.defaults})
    ctx = open_sweep(uri, exp, COMPARE_MODELS, "cmp", config)
    # The full model 0.04 ahead of "Speech only" plus a seed-dependent wobble, so the two pairings differ.
    wobble = {(f, s): 0.006 * ((f * 5 + s * 3) % 4) for f in FOLDS for s in SEEDS}
    for i, variant in enumerate(COMPARE_MODELS.variants):
        per_seed = {s: {f: fold_result(f, score(f, s) + (0.04 + wobble[f, s] if variant == "Full model" else 0.0))
                        for f in FOLDS} for s in SEEDS}
        result = TrialResult(per_fold=per_seed[SEEDS[0]], summary=summarize_trial(per_seed[SEEDS[0]], per_seed),
                             per_seed=per_seed)
        log_trial(ctx, f"t{i}", {"variant": variant}, config, result)
    [sweep] = collect_sweeps(uri, exp, ctx.parent_run_id)
    runs = {t.variant: t for t in sweep.trials}
    comparisons = compare_records(uri, runs["Full model"], runs["Speech only"], label_a="A", label_b="B",
                                  metrics=("test_ua",))
    by_pairing = {c.pairing: c.result for c in comparisons}
    assert sorted(by_pairing) == ["folds", "folds x seeds"]
    a = np.array([score(f, s) + 0.04 + wobble[f, s] for f in FOLDS for s in SEEDS])
    b = np.array([score(f, s) for f in FOLDS for s in SEEDS])
    pairs = by_pairing["folds x seeds"]
    assert pairs.keys == tuple((f, s) for f in FOLDS for s in SEEDS) and pairs.n == 9
    assert pairs.t_pvalue == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue)
    assert pairs.wilcoxon_pvalue == pytest.approx(scipy.stats.wilcoxon(np.round(a - b, 12)).pvalue)
    folds = by_pairing["folds"]
    means_a, means_b = a.reshape(3, 3).mean(axis=1), b.reshape(3, 3).mean(axis=1)
    assert folds.n == 3 and folds.t_pvalue == pytest.approx(scipy.stats.ttest_rel(means_a, means_b).pvalue)
    assert folds.mean_difference == pytest.approx(pairs.mean_difference) == pytest.approx((a - b).mean())
    text = format_run_comparison(runs["Full model"], runs["Speech only"], comparisons)
    assert "paired per (fold, seed)" in text and "paired per fold (mean over its seeds)" in text

    [table] = sweep_tables(sweep, uri)
    lines = [n for n in table.notes if n.startswith("test UA: Full model − ")]
    assert [line.split(" − ")[1].split(" = ")[0] for line in lines] == \
        ["Speech only", "Text only", "Early fusion", "Crossmodal without FA"]
    assert all("n=3" in line and line.endswith("[per fold]") for line in lines)


def test_seeds_flags_and_validation():
    from ser_platform.cli import build_config, build_parser, experiment_parser

    args = experiment_parser("compare_models", "x", "").parse_args(["--seeds", "3", "--seed", "2"])
    config = build_config(args)
    assert config.train.seeds == 3 and config.train.seed == 2

    args = build_parser().parse_args(["train", "--seeds", "2"])
    assert args.seeds == 2
    with pytest.raises(ConfigError, match="train.seeds=0"):
        load_config("demo", overrides={"train.seeds": 0})


# One real Ray Train run with two seeds: tests/integration/test_seeds_ray.py.
