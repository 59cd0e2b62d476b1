"""The statistics every layer shares: confidence intervals and tests for proportions, paired and
independent differences, AUROC and medians, exact binomial bounds. Pure functions of counts and values (no torch, no records)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Z95", "wilson_interval", "newcombe_interval", "mcnemar_p_value", "paired_drop_interval", "auroc_interval", "median_interval",
           "auc_score", "threshold_at_fpr", "best_advantage_threshold", "count_above", "roc_points",
           "clopper_pearson_lower", "clopper_pearson_upper", "clopper_pearson_interval", "binomial_two_sided_p"]

Z95 = 1.959963984540054  # the standard normal quantile for a two-sided 95% interval


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p_value(n10: int, n01: int) -> float:
    """Exact two-sided McNemar test: under "no change", each of the D = n10 + n01 discordant pairs
    is equally likely to have gone either way, so min(n10, n01) ~ Binomial(D, 1/2); p doubles its tail.

    >>> round(mcnemar_p_value(10, 2), 4)
    0.0386
    """
    if n10 < 0 or n01 < 0:
        raise ValueError("discordant counts cannot be negative")
    d, k = n10 + n01, min(n10, n01)
    if d == 0:
        return 1.0
    # P(X <= k) summed down from its largest term, in ratios, so neither 2**-d nor C(d, k) overflows
    log_top = math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1) - d * math.log(2.0)
    total = ratio = 1.0
    for j in range(k, 0, -1):
        ratio *= j / (d - j + 1)
        total += ratio
        if ratio < 1e-17 * total:
            break
    return min(1.0, 2.0 * math.exp(log_top) * total)


def _tango_score(b: int, c: int, n: int, delta: float) -> float:
    """Tango's (1998) score statistic for H0: p10 - p01 = delta over n pairs (b = n10, c = n01).

    The variance of b - c is taken at the maximum-likelihood cell probabilities under H0: with q the
    probability of a 0 -> 1 pair, the likelihood equation is 2n q^2 + W q - c delta (1 - delta) = 0,
    W = -(b + c) + delta (2n - b + c), whose non-negative root is q. Var(b - c) = n (2q + delta (1 - delta)).
    """
    w = -(b + c) + delta * (2 * n - b + c)
    q = (math.sqrt(max(0.0, w * w + 8.0 * n * c * delta * (1.0 - delta))) - w) / (4.0 * n)
    var = n * (2.0 * q + delta * (1.0 - delta))
    num = b - c - n * delta
    if var <= 0.0:  # only at delta = +-1 or with no pair at all: the statistic is infinite unless it is 0/0
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def paired_drop_interval(n10: int, n01: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% interval for the paired drop (n10 - n01) / n over n samples scored by both runs.

    n10 samples were right in the baseline and wrong now, n01 the reverse. Tango's (1998) score
    interval: the drops delta whose score test is not rejected, |Z(delta)| <= z. Unlike an interval
    conditioned on the D = n10 + n01 discordant pairs, it accounts for the randomness of D: with D = 0
    it is [-z^2/(n + z^2), z^2/(n + z^2)] (not [0, 0]), so ten samples with nothing changed cannot
    show that nothing got worse. Matches Tango's and Agresti & Min's (2005) published examples.

    >>> [round(v, 3) for v in paired_drop_interval(9, 3, 32)]
    [-0.027, 0.39]
    """
    if n <= 0 or n10 < 0 or n01 < 0 or n10 + n01 > n:
        raise ValueError(f"need 0 <= n10 + n01 <= n and n > 0, got n10={n10}, n01={n01}, n={n}")
    est = (n10 - n01) / n

    def root(target: float, above: float, below: float) -> float:
        # Z decreases in delta: `above` has Z > target, `below` has Z <= target
        for _ in range(100):
            mid = (above + below) / 2
            above, below = (mid, below) if _tango_score(n10, n01, n, mid) > target else (above, mid)
        return (above + below) / 2

    lo = -1.0 if _tango_score(n10, n01, n, -1.0) <= z else root(z, -1.0, est)
    hi = 1.0 if _tango_score(n10, n01, n, 1.0) >= -z else root(-z, est, 1.0)
    return (lo, hi)


def newcombe_interval(s1: int, n1: int, s2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (1998, method 10) for p1 - p2 of two independent proportions,
    built from the two Wilson intervals; used when per-sample outcomes are not there to pair."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("both proportions need a sample count")
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson_interval(s1, n1, z)
    l2, u2 = wilson_interval(s2, n2, z)
    diff = p1 - p2
    return (diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def _auroc_variance(theta: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil's (1982) variance of an AUROC estimate at the true value theta, with both group
    sizes replaced by their mean (Newcombe 2006) so the interval does not depend on which group is which."""
    m = (n_pos + n_neg) / 2.0
    return theta * (1 - theta) / (n_pos * n_neg) * (1 + (m - 1) * ((1 - theta) / (2 - theta) + theta / (1 + theta)))


def auroc_interval(auc: float, n_pos: int, n_neg: int, z: float = Z95) -> tuple[float, float]:
    """95% interval for an AUROC measured on n_pos positive and n_neg negative trials.

    A score interval (Newcombe 2006): the values theta with (auc - theta)^2 <= z^2 Var(theta), Var the
    Hanley-McNeil variance taken at theta rather than at the estimate. Unlike auc +- z * SE(auc) it
    does not collapse to a point at perfect separation (auc = 1 on 20 + 20 trials gives [0.899, 1]).
    With no trial on either side nothing was measured: [0, 1].
    """
    if n_pos <= 0 or n_neg <= 0:
        return (0.0, 1.0)
    if not 0.0 <= auc <= 1.0:
        raise ValueError(f"an AUROC lies in [0, 1], got {auc}")

    def outside(theta: float) -> bool:
        return (auc - theta) ** 2 > z * z * _auroc_variance(theta, n_pos, n_neg)

    def root(inside: float, out: float) -> float:  # bisection between a point inside and one outside
        for _ in range(60):
            mid = (inside + out) / 2
            inside, out = (inside, mid) if outside(mid) else (mid, out)
        return inside

    lo = 0.0 if not outside(0.0) else root(auc, 0.0)
    hi = 1.0 if not outside(1.0) else root(auc, 1.0)
    return (lo, hi)


def median_interval(values: Any, z: float = Z95) -> tuple[float, float]:
    """Distribution-free 95% interval for the median of `values` from two order statistics.

    The sample's k-th smallest and k-th largest values, k the largest with P(Binomial(n, 1/2) < k) <=
    alpha/2, cover the true median with probability >= 95% whatever the distribution (continuous).
    Infinite values (a point an attack never broke) count as the largest, so the upper end may be
    inf. Under 6 values no such k exists and the interval is unbounded: (-inf, inf).
    """
    xs = sorted(float(v) for v in values)
    n = len(xs)
    alpha_half = (1.0 - math.erf(z / math.sqrt(2.0))) / 2.0
    k, cdf, term = 0, 0.0, 0.5 ** n  # cdf = P(X <= k - 1), term = P(X = k)
    while k < n and cdf + term <= alpha_half:
        cdf += term
        term *= (n - k) / (k + 1)
        k += 1
    # P(X < k) <= alpha/2 now holds for k (and fails for k + 1)
    if k == 0:
        return (-math.inf, math.inf)
    return (xs[k - 1], xs[n - k])


# --- scores of two groups (membership inference): ROC, AUC, thresholds --------------------------
# A trial is called positive when its score is strictly above the threshold.

def _array(values: Any) -> Any:
    import numpy as np

    return np.asarray(values, dtype=np.float64).ravel()


def auc_score(pos: Any, neg: Any) -> float:
    """The area under the ROC curve of scores `pos` (positive trials) against `neg`: the probability
    that a random positive scores above a random negative, ties counting one half (Mann-Whitney U
    over the pooled ranks). NaN with no trial on either side.

    >>> auc_score([3, 2], [1, 2])
    0.875
    """
    import numpy as np
    from scipy.stats import rankdata

    p, n = _array(pos), _array(neg)
    if len(p) == 0 or len(n) == 0:
        return math.nan
    ranks = rankdata(np.concatenate([p, n]))
    return float((ranks[: len(p)].sum() - len(p) * (len(p) + 1) / 2) / (len(p) * len(n)))


def threshold_at_fpr(neg: Any, fpr: float) -> float:
    """The lowest threshold that calls at most a share `fpr` of the negative trials `neg` positive:
    the (floor(fpr * n) + 1)-th largest negative score (calling positive only what is above it). With
    ties at that score fewer are called, never more; with floor(fpr * n) = 0 it is the largest score."""
    import numpy as np

    n = _array(neg)
    if len(n) == 0:
        raise ValueError("a threshold at a false-positive rate needs negative trials")
    k = int(math.floor(fpr * len(n) + 1e-9))
    return float(np.sort(n)[::-1][min(k, len(n) - 1)])


def count_above(scores: Any, threshold: float) -> int:
    """How many scores the threshold calls positive (strictly above it)."""
    return int((_array(scores) > threshold).sum())


def best_advantage_threshold(pos: Any, neg: Any) -> float:
    """The threshold maximising TPR - FPR (Yeom et al.'s membership advantage) on these trials; of
    equally good ones, the highest."""
    import numpy as np

    p, n = _array(pos), _array(neg)
    if len(p) == 0 or len(n) == 0:
        raise ValueError("the advantage needs positive and negative trials")
    cuts = np.unique(np.concatenate([p, n, [-np.inf]]))  # ascending; "above cut" for each
    tpr = 1.0 - np.searchsorted(np.sort(p), cuts, side="right") / len(p)
    fpr = 1.0 - np.searchsorted(np.sort(n), cuts, side="right") / len(n)
    gap = tpr - fpr
    best = np.flatnonzero(gap >= gap.max() - 1e-12)[-1]
    return float(cuts[best])


def roc_points(pos: Any, neg: Any, max_points: int = 300) -> tuple[list[float], list[float]]:
    """The ROC curve of `pos` against `neg` as (fpr, tpr) lists, fpr ascending from (0, 0) to (1, 1),
    thinned to at most about `max_points` points spaced evenly in log FPR (the low-FPR end, where a
    membership attack is judged, keeps its detail; every vertex at the smallest FPRs is kept)."""
    import numpy as np

    p, n = np.sort(_array(pos)), np.sort(_array(neg))
    if len(p) == 0 or len(n) == 0:
        return [0.0, 1.0], [0.0, 1.0]
    cuts = np.unique(np.concatenate([p, n]))[::-1]  # descending: the curve's vertices in order
    tpr = np.concatenate([[0.0], 1.0 - np.searchsorted(p, cuts, side="left") / len(p)])
    fpr = np.concatenate([[0.0], 1.0 - np.searchsorted(n, cuts, side="left") / len(n)])
    if len(fpr) > max_points:
        grid = np.concatenate([[0.0], np.logspace(math.log10(1.0 / len(n)), 0.0, max_points - 2)])
        # at each grid FPR the vertex with the highest TPR not beyond it, and the curve's end
        keep = np.unique(np.concatenate([[0], np.searchsorted(fpr, grid, side="right") - 1, [len(fpr) - 1]]))
        fpr, tpr = fpr[keep], tpr[keep]
    return [round(float(v), 6) for v in fpr], [round(float(v), 6) for v in tpr]


# --- exact binomial bounds (randomized smoothing's certificates) --------------------------------

def clopper_pearson_lower(k: Any, n: Any, alpha: float) -> Any:
    """The one-sided (1 - alpha) lower confidence bound of a binomial proportion from k of n: the
    alpha quantile of Beta(k, n - k + 1), 0 where k is 0 (for k = n it is alpha ** (1 / n) exactly).
    k and n may be numbers or numpy arrays; the answer has k's form."""
    import numpy as np
    from scipy.stats import beta

    k_arr, n_arr = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = np.where(k_arr <= 0, 0.0, beta.ppf(alpha, np.maximum(k_arr, 1.0), n_arr - k_arr + 1.0))
    return float(out) if np.ndim(out) == 0 else out


def clopper_pearson_upper(k: Any, n: Any, alpha: float) -> Any:
    """The one-sided (1 - alpha) upper confidence bound: the 1 - alpha quantile of Beta(k + 1, n - k), 1 where k is n."""
    import numpy as np
    from scipy.stats import beta

    k_arr, n_arr = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = np.where(k_arr >= n_arr, 1.0, beta.ppf(1.0 - alpha, k_arr + 1.0, np.maximum(n_arr - k_arr, 1.0)))
    return float(out) if np.ndim(out) == 0 else out


def clopper_pearson_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The exact two-sided (1 - alpha) interval of a proportion: alpha / 2 in each tail; [0, 1] for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    return float(clopper_pearson_lower(k, n, alpha / 2)), float(clopper_pearson_upper(k, n, alpha / 2))


def binomial_two_sided_p(k: Any, n: Any, p: float = 0.5) -> Any:
    """The two-sided exact binomial test's p-value of k successes in n at probability p (1 for n = 0).
    Vectorised over numpy arrays; for p = 1/2 the test is symmetric: 2 P(X >= max(k, n - k)), capped at 1."""
    import numpy as np
    from scipy.stats import binom, binomtest

    k_arr, n_arr = np.asarray(k), np.asarray(n)
    if p == 0.5:
        far = np.maximum(k_arr, n_arr - k_arr)
        out = np.where(n_arr <= 0, 1.0, np.minimum(1.0, 2.0 * binom.sf(far - 1, np.maximum(n_arr, 1), 0.5)))
        return float(out) if np.ndim(out) == 0 else out
    flat = [1.0 if int(nn) <= 0 else binomtest(int(kk), int(nn), p).pvalue for kk, nn in zip(np.ravel(k_arr), np.ravel(n_arr))]
    out = np.asarray(flat).reshape(np.shape(k_arr))
    return float(out) if np.ndim(out) == 0 else out
