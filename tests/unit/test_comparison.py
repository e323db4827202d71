"""Paired comparison: every number against scipy called directly and against hand formulas (the t statistic, its
p from Student's t, the exact Wilcoxon p by enumerating signs, a numpy pair bootstrap), plus the edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from ser_platform.comparison import PairedComparison, format_comparison, paired_comparison

# Seven (fold, seed) pairs with distinct, non-zero |a - b| (no ties: scipy's Wilcoxon is then exact).
A = [0.62, 0.58, 0.66, 0.61, 0.70, 0.55, 0.64]
B = [0.60, 0.593, 0.61, 0.603, 0.66, 0.538, 0.615]
KEYS = [(fold, seed) for fold in (1, 2, 3, 4) for seed in (0, 1)][:7]


def _scores(values, keys=KEYS) -> dict:
    return dict(zip(keys, values))


def _exact_wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided exact signed-rank p: the rank sum of positive differences over all 2**n sign patterns."""
    ranks = scipy.stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    sums = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(d))])
    return min(1.0, 2 * min(np.mean(sums <= observed), np.mean(sums >= observed)))


def test_numbers_against_scipy_and_hand_formulas():
    cmp = paired_comparison(_scores(A), _scores(B), n_boot=10_000, seed=3)
    a, b = np.array(A), np.array(B)
    d = a - b
    n = len(d)
    assert cmp.n == n and cmp.keys == tuple(sorted(KEYS))
    assert cmp.mean_difference == pytest.approx(np.mean(d))
    assert cmp.mean_a == pytest.approx(a.mean()) and cmp.mean_b == pytest.approx(b.mean())
    assert cmp.std_difference == pytest.approx(np.std(d, ddof=1))

    t_hand = np.mean(d) / (np.std(d, ddof=1) / math.sqrt(n))
    t_scipy = scipy.stats.ttest_rel(a, b)
    assert cmp.t_statistic == pytest.approx(t_hand) == pytest.approx(t_scipy.statistic)
    assert cmp.t_pvalue == pytest.approx(2 * scipy.stats.t.sf(abs(t_hand), n - 1)) == pytest.approx(t_scipy.pvalue)

    assert cmp.wilcoxon_pvalue == pytest.approx(scipy.stats.wilcoxon(a, b).pvalue)
    assert cmp.wilcoxon_pvalue == pytest.approx(_exact_wilcoxon_p(d)) and cmp.wilcoxon_note is None

    direct = scipy.stats.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True,
                                   vectorized=True, n_resamples=10_000, confidence_level=0.95, method="BCa",
                                   rng=np.random.default_rng(3))
    assert (cmp.ci_low, cmp.ci_high) == pytest.approx(
        (direct.confidence_interval.low, direct.confidence_interval.high))
    # A percentile bootstrap of pairs written out with numpy lands close by (BCa only shifts the quantiles).
    means = d[np.random.default_rng(0).integers(0, n, size=(20_000, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    width = high - low
    assert abs(cmp.ci_low - low) < 0.15 * width and abs(cmp.ci_high - high) < 0.15 * width
    assert cmp.ci_method.startswith("BCa bootstrap")


def test_wilcoxon_ties_despite_float_noise():
    # Differences of exactly 1, 1, 2, 3, -1, 4 tenths; in floats 0.3 - 0.2 is 0.09999999999999998, 0.2 - 0.1 is 0.1.
    a = [0.3, 0.2, 0.5, 0.7, 0.4, 0.9]
    b = [0.2, 0.1, 0.3, 0.4, 0.5, 0.5]
    raw = [x - y for x, y in zip(a, b)]
    exact = scipy.stats.wilcoxon([1, 1, 2, 3, -1, 4]).pvalue
    assert scipy.stats.wilcoxon(raw).pvalue != pytest.approx(exact)  # the float noise changes the ranks
    cmp = paired_comparison(dict(enumerate(a)), dict(enumerate(b)))
    assert cmp.wilcoxon_pvalue == pytest.approx(exact)


def test_the_seed_fixes_the_interval():
    first = paired_comparison(_scores(A), _scores(B), n_boot=2000, seed=7)
    assert paired_comparison(_scores(A), _scores(B), n_boot=2000, seed=7) == first
    other = paired_comparison(_scores(A), _scores(B), n_boot=2000, seed=8)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)
    assert other.t_pvalue == first.t_pvalue  # only the bootstrap is random


def test_identical_scores():
    for values in (A, A[:5]):
        cmp = paired_comparison(_scores(values), _scores(values))
        assert cmp.mean_difference == 0.0 and (cmp.ci_low, cmp.ci_high) == (0.0, 0.0)
        assert cmp.t_statistic is None and cmp.t_pvalue is None and "0/0" in cmp.t_note
        assert cmp.wilcoxon_pvalue is None and cmp.wilcoxon_note
        assert cmp.verdict == "no difference"
    assert "every difference is 0" in paired_comparison(_scores(A), _scores(A)).wilcoxon_note


def test_constant_shift_is_degenerate_but_beyond_noise():
    a = [0.5, 0.6, 0.7, 0.8, 0.9]
    cmp = paired_comparison(_scores(a), _scores([v - 0.25 for v in a]))  # 0.25 is exact in binary
    assert cmp.ci_low == cmp.ci_high == 0.25 and cmp.t_statistic == math.inf and cmp.t_pvalue == 0.0
    assert cmp.verdict == "beyond noise"
    with pytest.warns(RuntimeWarning, match="Precision loss"):  # what scipy says for the same case
        direct = scipy.stats.ttest_rel(a, [v - 0.25 for v in a])
    assert (direct.statistic, direct.pvalue) == (math.inf, 0.0)
    assert paired_comparison(_scores([0.3, 0.4]), _scores([0.55, 0.65])).t_statistic == -math.inf


def test_mismatched_keys_are_named():
    a = {(1, 0): 0.5, (2, 0): 0.6, (3, 0): 0.7}
    b = {(1, 0): 0.5, (2, 0): 0.6, (4, 1): 0.7}
    with pytest.raises(ValueError, match=r"only in a: \[\(3, 0\)\], only in b: \[\(4, 1\)\]"):
        paired_comparison(a, b)
    with pytest.raises(ValueError, match=r"only in a: \[\], only in b: \[\(4, 1\)\]"):
        paired_comparison({k: v for k, v in a.items() if k != (3, 0)}, b)


def test_bad_values_and_options():
    with pytest.raises(ValueError, match=r"b\[\(2, 0\)\] = nan is not finite"):
        paired_comparison({(1, 0): 0.5, (2, 0): 0.6}, {(1, 0): 0.5, (2, 0): float("nan")})
    with pytest.raises(ValueError, match=r"a\[\(1, 0\)\] = 'x' is not a number"):
        paired_comparison({(1, 0): "x"}, {(1, 0): 0.5})
    with pytest.raises(ValueError, match="both sides are empty"):
        paired_comparison({}, {})
    with pytest.raises(ValueError, match="confidence=95"):
        paired_comparison(_scores(A), _scores(B), confidence=95)
    with pytest.raises(ValueError, match="n_boot=0"):
        paired_comparison(_scores(A), _scores(B), n_boot=0)


def test_large_consistent_difference_is_beyond_noise():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.55, 0.65, size=5)
    a = b + 0.05 + rng.normal(0, 0.005, size=5)  # +5 points, every fold, noise 0.5 points
    cmp = paired_comparison(_scores(a, KEYS[:5]), _scores(b, KEYS[:5]))
    assert cmp.verdict == "beyond noise" and cmp.ci_low > 0 and cmp.t_pvalue < 0.05


def test_tiny_noisy_difference_is_within_noise():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.55, 0.65, size=5)
    a = b + 0.002 + rng.normal(0, 0.02, size=5)  # +0.2 points under 2 points of fold-to-fold noise
    cmp = paired_comparison(_scores(a, KEYS[:5]), _scores(b, KEYS[:5]))
    assert cmp.verdict == "within noise" and cmp.ci_low < 0 < cmp.ci_high and cmp.t_pvalue >= 0.05


def test_borderline_when_the_interval_and_the_t_test_disagree():
    # Five differences: the bootstrap interval excludes 0 while Student's t with 4 df does not reject.
    d = np.array([0.01, 0.02, 0.015, 0.03, -0.005])
    b = np.full(5, 0.6)
    cmp = paired_comparison(_scores(b + d, KEYS[:5]), _scores(b, KEYS[:5]))
    assert scipy.stats.ttest_rel(b + d, b).pvalue > 0.05 and cmp.t_pvalue > 0.05
    assert cmp.ci_low > 0
    assert cmp.verdict == "borderline"
    assert cmp.wilcoxon_pvalue is None and "0.0625" in cmp.wilcoxon_note  # n=5: 2/2**5


def test_one_pair_cannot_tell():
    cmp = paired_comparison({(5, 0): 0.7}, {(5, 0): 0.6})
    assert cmp.mean_difference == pytest.approx(0.1) and cmp.std_difference is None
    assert cmp.t_pvalue is None and cmp.ci_low is None and cmp.verdict == "cannot tell"


def test_format_comparison():
    cmp = paired_comparison(_scores(A), _scores(B), n_boot=2000)
    line = format_comparison(cmp, "test UA", label_a="full", label_b="without FA")
    mean = 100 * (np.mean(A) - np.mean(B))
    expected_ci = f"95% CI {100 * cmp.ci_low:+.2f} \u2026 {100 * cmp.ci_high:+.2f}".replace("-", "\u2212")
    assert line == (f"test UA: full \u2212 without FA = {mean:+.2f} points ({expected_ci}, "
                    f"paired t p={cmp.t_pvalue:.2g}, Wilcoxon p={cmp.wilcoxon_pvalue:.2g}, n=7): {cmp.verdict}")
    assert "\n" not in line
    worse = format_comparison(paired_comparison(_scores(B), _scores(A), n_boot=2000), "WA", scale=1, unit="")
    assert worse.startswith(f"WA: A \u2212 B = \u2212{np.mean(A) - np.mean(B):.2f} (")
    single = format_comparison(paired_comparison({1: 0.7}, {1: 0.6}), "UA")
    assert single == "UA: A \u2212 B = +10.00 points (no CI, paired t n/a, n=1): cannot tell"


def test_result_is_a_frozen_record():
    cmp = paired_comparison(_scores(A), _scores(B), n_boot=500)
    assert isinstance(cmp, PairedComparison)
    assert cmp.differences == pytest.approx(tuple(np.array(A) - np.array(B)))
    assert cmp.alpha == pytest.approx(0.05)
    with pytest.raises(AttributeError):
        cmp.verdict = "beyond noise"  # type: ignore[misc]
