"""Is model A better than model B, or is the gap within the noise of five folds? A paired comparison.

Scores are paired by ``(fold, seed)``: both models saw the same test speakers (and, per seed, the same
initialisation seed), so the per-pair difference ``d = a - b`` removes what the folds share (a hard test session
lowers both). With ``n`` pairs:

* mean difference ``mean(d)``;
* paired t-test (``scipy.stats.ttest_rel(a, b)``, two-sided): ``t = mean(d) / (sd(d) / sqrt(n))`` with the
  sample standard deviation (ddof 1), ``n - 1`` degrees of freedom;
* Wilcoxon signed-rank test (``scipy.stats.wilcoxon`` of the differences rounded to 12 decimals, so equal
  differences tie despite float noise; two-sided, zero differences dropped), only for
  ``n >= 6``: with 5 pairs its smallest possible two-sided p is 2 / 2**5 = 0.0625, so it could never reject;
* a bootstrap confidence interval of ``mean(d)``: ``scipy.stats.bootstrap(paired=True)`` resamples whole pairs,
  BCa (scipy's default method; percentile where BCa is undefined), ``n_boot`` resamples from
  ``numpy.random.default_rng(seed)``, so a seed gives the same interval.

The verdict (``PairedComparison.verdict``) needs both checks to agree, at level ``alpha = 1 - confidence``:

``"beyond noise"``  the interval excludes 0 and the t-test's p < alpha;
``"within noise"``  the interval holds 0 and p >= alpha;
``"borderline"``    they disagree. With 5 pairs this is common: a bootstrap interval from 5 values is too
                    narrow (it uses the spread of the 5 differences as if it were known, where the t-test widens
                    it by Student's t with 4 degrees of freedom), so it can exclude 0 while p is above alpha;
``"no difference"`` every difference is 0 (within ``FLOAT_TOLERANCE``); a constant non-zero shift has zero
                    spread, t = ±inf, p = 0, a one-point interval, and is "beyond noise";
``"cannot tell"``   one pair: no spread, no test.

Pairs of one fold with different seeds share their test speakers, so they are not independent: the tests treat
them as if they were, which makes p-values and the interval optimistic when seeds are many and folds few. For the
stricter comparison average each fold's seeds first and pass one score per fold (keys ``(fold, 0)``).

Values are whatever the caller measured; WA and UA in this repo are fractions in [0, 1], so ``format_comparison``
shows differences ×100 as percentage points by default.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Hashable, Mapping

import numpy as np

# No module-level scipy.stats (~0.9 s to import here): the three functions that use it import it, since every Tune
# trial actor imports this module (sweep -> tables) and never compares.

WILCOXON_MIN_PAIRS = 6
# Differences closer than this count as equal: scores subtracted in floating point (0.3 - 0.55 vs 0.4 - 0.65)
# differ by ~1e-16, which would otherwise turn a constant shift into a t of 1e15 and a precision-loss warning.
FLOAT_TOLERANCE = 1e-12
VERDICTS = ("beyond noise", "within noise", "borderline", "no difference", "cannot tell")


@dataclass(frozen=True)
class PairedComparison:
    """The result of ``paired_comparison``; differences are ``a - b``. A test that could not run holds None and
    says why in its ``*_note``."""

    keys: tuple[Hashable, ...]  # the (fold, seed) pairs, sorted
    a: tuple[float, ...]
    b: tuple[float, ...]
    differences: tuple[float, ...]  # a - b, in the order of keys
    n: int
    mean_a: float
    mean_b: float
    mean_difference: float
    std_difference: float | None  # sample standard deviation (ddof 1); None for one pair
    t_statistic: float | None
    t_pvalue: float | None
    t_note: str | None
    wilcoxon_pvalue: float | None
    wilcoxon_note: str | None
    ci_low: float | None
    ci_high: float | None
    ci_method: str  # how the interval was obtained (or why there is none)
    confidence: float
    n_boot: int
    seed: int
    verdict: str  # one of VERDICTS (see the module docstring)

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence


def _sorted_keys(keys) -> list:
    try:
        return sorted(keys)
    except TypeError:  # keys of mixed types: still a fixed order, so a seed gives the same resamples
        return sorted(keys, key=repr)


def _values(scores: Mapping[Hashable, float], keys: list, side: str) -> np.ndarray:
    out = np.empty(len(keys))
    for i, key in enumerate(keys):
        value = scores[key]
        try:
            out[i] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"paired_comparison: {side}[{key!r}] = {value!r} is not a number") from None
        if not math.isfinite(out[i]):
            raise ValueError(f"paired_comparison: {side}[{key!r}] = {value!r} is not finite")
    return out


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def _bootstrap_interval(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int,
                        confidence: float) -> tuple[float, float, str]:
    import scipy.stats

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            # BCa is undefined for some small discrete samples (scipy warns and returns NaN): handled below.
            warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
            result = scipy.stats.bootstrap((a, b), _mean_difference, paired=True, vectorized=True,
                                           n_resamples=n_boot, confidence_level=confidence, method=method,
                                           rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return low, high, f"{method} bootstrap over pairs (scipy.stats.bootstrap, paired=True, {n_boot} resamples)"
    raise ValueError(f"paired_comparison: the bootstrap gave no finite interval for differences {(a - b).tolist()}")


def _paired_keys(a: Mapping[Hashable, float], b: Mapping[Hashable, float], n_boot: int, confidence: float) -> list:
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"paired_comparison: n_boot={n_boot!r}, expected a positive integer")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_comparison: confidence={confidence!r}, expected a level in (0, 1) such as 0.95")
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    if only_a or only_b:
        raise ValueError(f"paired_comparison: the two sides must have the same (fold, seed) keys; only in a: "
                         f"{_sorted_keys(only_a)}, only in b: {_sorted_keys(only_b)}")
    if not a:
        raise ValueError("paired_comparison: no scores to compare (both sides are empty)")
    return _sorted_keys(a)


def _t_and_interval(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int, confidence: float) -> dict:
    """The paired t-test and the bootstrap interval of the mean difference, or why they are degenerate."""
    import scipy.stats

    d = x - y
    if len(d) < 2:
        return {"t_note": "one pair: no spread to test against", "ci_method": "none: one pair has no spread"}
    if np.all(np.abs(d) <= FLOAT_TOLERANCE):
        return {"t_note": "every difference is 0: t is 0/0", "ci_low": 0.0, "ci_high": 0.0,
                "ci_method": "degenerate: every difference is 0"}
    if np.ptp(d) <= FLOAT_TOLERANCE:
        # A constant shift: zero spread, so t = ±inf and p = 0 (what ttest_rel returns, after a precision-loss
        # warning), and every resample has the same mean.
        mean = float(d.mean())
        return {"t_statistic": math.copysign(math.inf, mean), "t_pvalue": 0.0, "ci_low": mean, "ci_high": mean,
                "t_note": "every difference is the same: zero spread",
                "ci_method": "degenerate: every difference is the same"}
    result = scipy.stats.ttest_rel(x, y)
    ci_low, ci_high, ci_method = _bootstrap_interval(x, y, n_boot, seed, confidence)
    return {"t_statistic": float(result.statistic), "t_pvalue": float(result.pvalue), "ci_low": ci_low,
            "ci_high": ci_high, "ci_method": ci_method}


def _wilcoxon(d: np.ndarray, all_zero: bool) -> dict:
    import scipy.stats

    n = len(d)
    if n < WILCOXON_MIN_PAIRS:
        return {"wilcoxon_note": f"n={n} < {WILCOXON_MIN_PAIRS}: the smallest two-sided p possible is {2 / 2 ** n:.3g}"}
    if all_zero:
        return {"wilcoxon_note": "every difference is 0: no ranks"}
    # Rounded so that differences equal on paper (0.61 - 0.60 and 0.59 - 0.58) tie in the ranks.
    return {"wilcoxon_pvalue": float(scipy.stats.wilcoxon(np.round(d, 12)).pvalue)}


def _verdict(n: int, all_zero: bool, tests: Mapping[str, object], confidence: float) -> str:
    if n < 2:
        return "cannot tell"
    if all_zero:
        return "no difference"
    interval_excludes_zero = tests["ci_low"] > 0 or tests["ci_high"] < 0
    t_rejects = tests["t_pvalue"] < 1.0 - confidence
    if interval_excludes_zero and t_rejects:
        return "beyond noise"
    return "within noise" if not interval_excludes_zero and not t_rejects else "borderline"


def paired_comparison(a: Mapping[Hashable, float], b: Mapping[Hashable, float], *, n_boot: int = 10_000,
                      seed: int = 0, confidence: float = 0.95) -> PairedComparison:
    """Compare scores ``a`` and ``b`` keyed by the same ``(fold, seed)`` pairs (see the module docstring).

    Raises ``ValueError`` if the keys differ (naming the keys found on one side only), if there are none, or if
    a score is not a finite number.
    """
    keys = _paired_keys(a, b, n_boot, confidence)
    x, y = _values(a, keys, "a"), _values(b, keys, "b")
    d = x - y
    n = len(keys)
    all_zero = bool(np.all(np.abs(d) <= FLOAT_TOLERANCE))
    tests = {"t_statistic": None, "t_pvalue": None, "t_note": None, "ci_low": None, "ci_high": None,
             **_t_and_interval(x, y, n_boot, seed, confidence)}
    wilcoxon = {"wilcoxon_pvalue": None, "wilcoxon_note": None, **_wilcoxon(d, all_zero)}
    return PairedComparison(
        keys=tuple(keys), a=tuple(x.tolist()), b=tuple(y.tolist()), differences=tuple(d.tolist()), n=n,
        mean_a=float(x.mean()), mean_b=float(y.mean()), mean_difference=float(d.mean()),
        std_difference=float(d.std(ddof=1)) if n > 1 else None, **tests, **wilcoxon, confidence=confidence,
        n_boot=n_boot, seed=seed, verdict=_verdict(n, all_zero, tests, confidence),
    )


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}".replace("-", "\u2212")


def format_comparison(cmp: PairedComparison, metric_name: str, *, label_a: str = "A", label_b: str = "B",
                      scale: float = 100.0, unit: str = "points", digits: int = 2) -> str:
    """One line, e.g. ``test UA: A − B = +1.20 points (95% CI −0.40 … +2.80, paired t p=0.18, n=5): within noise``.

    Differences are multiplied by ``scale`` (100: fractions shown as percentage points, the repo's WA/UA are
    fractions); pass ``scale=1, unit=""`` for scores already in the unit to show.
    """
    shown = f"{_signed(scale * cmp.mean_difference, digits)}{' ' + unit if unit else ''}"
    level = f"{100 * cmp.confidence:g}%"
    details = []
    if cmp.ci_low is None:
        details.append("no CI")
    else:
        details.append(f"{level} CI {_signed(scale * cmp.ci_low, digits)} \u2026 {_signed(scale * cmp.ci_high, digits)}")
    details.append(f"paired t p={cmp.t_pvalue:.2g}" if cmp.t_pvalue is not None else "paired t n/a")
    if cmp.wilcoxon_pvalue is not None:
        details.append(f"Wilcoxon p={cmp.wilcoxon_pvalue:.2g}")
    details.append(f"n={cmp.n}")
    return f"{metric_name}: {label_a} \u2212 {label_b} = {shown} ({', '.join(details)}): {cmp.verdict}"

