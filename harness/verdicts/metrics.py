"""Metric ids (`family:subject@parameter`), the ids a suite will produce, and confidence intervals."""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["metric_id", "suite_metric_ids", "worst_groups", "wilson_interval", "metric_counts", "metric_intervals",
           "interval_methods",
           "mcnemar_p_value", "paired_drop_interval", "newcombe_interval", "auroc_interval", "median_interval", "Z95"]

Z95 = 1.959963984540054  # the standard normal quantile for a two-sided 95% interval


def metric_id(family: str, subject: Optional[str] = None, parameter: Optional[str] = None) -> str:
    out = family
    if subject is not None:
        out += f":{subject}"
    if parameter is not None:
        out += f"@{parameter}"
    return out


def _bounded(entry) -> bool:
    return hasattr(entry, "norm") and not entry.minimal


def entry_epsilons(attacks) -> list[list]:
    """Per attack entry, the epsilons it is judged at: its own, or for a minimal-perturbation attack
    that lists none, every epsilon the suite's bounded attacks use for its norm."""
    by_norm: dict[str, dict[float, object]] = {}
    for a in attacks:
        if _bounded(a):
            for eps in a.epsilons:
                by_norm.setdefault(a.norm, {}).setdefault(eps.value, eps)
    out = []
    for a in attacks:
        if not hasattr(a, "norm"):
            out.append([])
        elif a.epsilons:
            out.append(list(a.epsilons))
        else:
            out.append(sorted(by_norm.get(a.norm, {}).values(), key=lambda e: e.value))
    return out


def worst_groups(attacks, epsilons: Optional[list] = None) -> dict[tuple[str, float], str]:
    """(norm, epsilon value) -> the epsilon's label, as first written in the config."""
    groups: dict[tuple[str, float], str] = {}
    for a, eps_list in zip(attacks, epsilons if epsilons is not None else entry_epsilons(attacks)):
        for eps in eps_list:
            groups.setdefault((a.norm, eps.value), eps.label)
    return groups


def suite_metric_ids(config) -> list[str]:
    ids = ["clean_accuracy"]
    per_entry = entry_epsilons(config.attacks)
    for a, eps_list in zip(config.attacks, per_entry):
        if not hasattr(a, "norm"):  # corruptions: one robust accuracy per kind and severity
            ids += [metric_id("robust_accuracy", kind, str(sev)) for kind in a.kinds for sev in a.severities]
            continue
        if a.minimal:
            ids.append(metric_id("median_perturbation", a.attack_id))
        for eps in eps_list:
            ids.append(metric_id("robust_accuracy", a.attack_id, eps.label))
            ids.append(metric_id("attack_success_rate", a.attack_id, eps.label))
    for (norm, _), label in worst_groups(config.attacks, per_entry).items():
        ids.append(metric_id("robust_accuracy", f"worst-{norm}", label))
    from harness.evaluation.probes import probe_metric_ids

    return ids + _defense_metric_ids(config, ids) + [m for p in getattr(config, "probes", []) for m in probe_metric_ids(p)]


def _defense_metric_ids(config, base: list[str]) -> list[str]:
    """The metric ids the `defenses:` entries add (see harness.evaluation.variants)."""
    if not getattr(config, "defenses", None):
        return []
    from harness.evaluation.variants import defense_kind, detector_metric_ids, variant_subject

    out: list[str] = []
    for entry in config.defenses:
        kind = defense_kind(entry.build())
        if kind == "detector":
            out += detector_metric_ids(entry.defense_id, config.attacks)
            continue
        prefixes = [entry.defense_id] + ([f"{entry.defense_id}-naive"] if kind == "preprocessing" else [])
        out += [v for p in prefixes for m in base for v in [variant_subject(p, m)] if v is not None]
    return out


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def metric_counts(card: dict[str, Any]) -> dict[str, int]:
    """The number of samples behind each fraction metric of a scorecard record."""
    samples = card.get("provenance", {}).get("samples")
    n = None if samples is None else int(samples)  # unknown, not 0: a record without it has no whole-run counts
    counts: dict[str, int] = {} if n is None else {"clean_accuracy": n}
    variants = [a for d in card.get("defenses", []) for a in d.get("attacks", [])]
    for a in [*card.get("attacks", []), *variants]:
        counts[metric_id("robust_accuracy", a["id"], a["epsilon"])] = int(a["n"])
        if a.get("norm") is not None:
            counts[metric_id("attack_success_rate", a["id"], a["epsilon"])] = int(a["n_attacked"])
    for d in card.get("defenses", []):
        if d.get("kind") != "detector" and n is not None:
            counts[metric_id("clean_accuracy", d["id"])] = n
    for p in card.get("probes", []):
        if p.get("kind") == "probe":
            # a count of 0 is kept: a metric measured on no sample is inconclusive, not a point value
            if p.get("n_test") is not None:
                counts[metric_id("clean_accuracy", p["id"], p["fraction"])] = int(p["n_test"])
            if p.get("n_triggered") is not None:
                counts[metric_id("attack_success_rate", p["id"], p["fraction"])] = int(p["n_triggered"])
    for m in card.get("metrics", {}):
        if n is not None and (m.startswith("robust_accuracy:worst-") or (m.startswith("robust_accuracy:") and "/worst-" in m)):
            counts[m] = n
    return counts


def _producer_intervals(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The "metric_intervals" entries of a record's attacks, defenses (and the records nested in them,
    such as a defense's detector) and probes: {metric id: {"ci95", "method", "n", "why"?}}."""
    out: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            entries = node.get("metric_intervals")
            if isinstance(entries, dict):
                out.update({m: e for m, e in entries.items() if isinstance(e, dict)})
            for k, v in node.items():
                if k != "metric_intervals":
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for key in ("attacks", "defenses", "probes"):
        walk(card.get(key, []))
    return out


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _ci95(entry: dict[str, Any]) -> Optional[list[float]]:
    ci = entry.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) and not math.isnan(v) for v in ci):
        return [float(ci[0]), float(ci[1])]
    return None


def metric_intervals(card: dict[str, Any]) -> dict[str, list[float]]:
    """A 95% interval for every metric of a scorecard record that has one: Wilson for each fraction
    metric with a sample count ([0, 1] when that count is 0: nothing was measured), and every "ci95"
    its producers give in their "metric_intervals" entries (these win). An upper end may be inf."""
    counts = metric_counts(card)
    out: dict[str, list[float]] = {}
    for m, value in card.get("metrics", {}).items():
        n = counts.get(m)
        if n == 0:
            out[m] = [0.0, 1.0]
        elif n and _fraction(value):
            lo, hi = wilson_interval(round(value * n), n)
            out[m] = [round(lo, 6), round(hi, 6)]
    for m, entry in _producer_intervals(card).items():
        ci = _ci95(entry)
        if ci is not None and m in card.get("metrics", {}):
            out[m] = [round(v, 6) if math.isfinite(v) else v for v in ci]
    return out


def interval_methods(card: dict[str, Any]) -> dict[str, dict[str, str]]:
    """How each metric's interval was made: {metric id: {"method": "wilson" | "auroc-score" |
    "order-statistic" | ... | "point"}}, with "why" for a "point" metric (one without an interval) and
    "n": 0 for a producer's metric measured on no sample."""
    counts = metric_counts(card)
    produced = _producer_intervals(card)
    out: dict[str, dict[str, str]] = {}
    for m, value in card.get("metrics", {}).items():
        entry = produced.get(m)
        if entry is not None and _ci95(entry) is not None:
            out[m] = {"method": str(entry.get("method") or "interval")}
            if entry.get("n") == 0:  # kept so a gate knows nothing was measured
                out[m]["n"] = 0
        elif entry is not None:
            out[m] = {"method": "point", "why": str(entry.get("why") or "its producer computes no interval for it")}
        elif m in counts and (counts[m] == 0 or _fraction(value)):
            out[m] = {"method": "wilson"}
        else:
            out[m] = {"method": "point", "why": "no sample count or interval is recorded for this metric"}
    return out


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


def curves(card: dict[str, Any]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Robust accuracy against epsilon, per norm: one line per attack id and one for the worst case."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    labels: dict[tuple[str, str], float] = {}
    for a in card.get("attacks", []):
        if a.get("norm") is None or a.get("epsilon_value") is None or not math.isfinite(a["epsilon_value"]):
            continue
        out.setdefault(a["norm"], {}).setdefault(a["id"], []).append((a["epsilon_value"], a["robust_accuracy"]))
        labels[(a["norm"], a["epsilon"])] = a["epsilon_value"]
    for key, value in card.get("metrics", {}).items():
        if key.startswith("robust_accuracy:worst-"):
            norm, _, label = key.removeprefix("robust_accuracy:worst-").partition("@")
            if (norm, label) in labels:
                out.setdefault(norm, {}).setdefault("worst", []).append((labels[(norm, label)], value))
    return {norm: {k: sorted(v) for k, v in lines.items()} for norm, lines in out.items()}
