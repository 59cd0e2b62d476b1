"""Metric ids (`family:subject@parameter`), the ids a suite will produce, and confidence intervals."""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["metric_id", "suite_metric_ids", "worst_groups", "wilson_interval", "metric_counts", "metric_intervals",
           "mcnemar_p_value", "paired_drop_interval", "newcombe_interval", "Z95"]

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
    from .probes import probe_metric_ids

    return ids + _defense_metric_ids(config, ids) + [m for p in getattr(config, "probes", []) for m in probe_metric_ids(p)]


def _defense_metric_ids(config, base: list[str]) -> list[str]:
    """The metric ids the `defenses:` entries add (see harness.variants)."""
    if not getattr(config, "defenses", None):
        return []
    from .variants import _first_white_box, defense_kind, variant_subject

    out: list[str] = []
    for entry in config.defenses:
        kind = defense_kind(entry.build())
        if kind == "detector":
            found = _first_white_box(config.attacks)
            if found is not None:
                cfg, _ = found
                for eps in cfg.epsilons:
                    out += [metric_id(f, f"{entry.defense_id}/{cfg.attack_id}", eps.label) for f in ("detection_rate", "auroc")]
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
    n = int(card.get("provenance", {}).get("samples", 0))
    counts = {"clean_accuracy": n}
    variants = [a for d in card.get("defenses", []) for a in d.get("attacks", [])]
    for a in [*card.get("attacks", []), *variants]:
        counts[metric_id("robust_accuracy", a["id"], a["epsilon"])] = int(a["n"])
        if a.get("norm") is not None:
            counts[metric_id("attack_success_rate", a["id"], a["epsilon"])] = int(a["n_attacked"])
    for d in card.get("defenses", []):
        if d.get("kind") != "detector":
            counts[metric_id("clean_accuracy", d["id"])] = n
    for p in card.get("probes", []):
        if p.get("kind") == "probe":
            if p.get("n_test"):
                counts[metric_id("clean_accuracy", p["id"], p["fraction"])] = int(p["n_test"])
            if p.get("n_triggered"):
                counts[metric_id("attack_success_rate", p["id"], p["fraction"])] = int(p["n_triggered"])
    for m in card.get("metrics", {}):
        if m.startswith("robust_accuracy:worst-") or (m.startswith("robust_accuracy:") and "/worst-" in m):
            counts[m] = n
    return counts


def metric_intervals(card: dict[str, Any]) -> dict[str, list[float]]:
    """A 95% Wilson interval for every fraction metric of a scorecard record that has a sample count."""
    counts = metric_counts(card)
    out: dict[str, list[float]] = {}
    for m, value in card.get("metrics", {}).items():
        n = counts.get(m)
        if n and isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
            lo, hi = wilson_interval(round(value * n), n)
            out[m] = [round(lo, 6), round(hi, 6)]
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


def paired_drop_interval(n10: int, n01: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% interval for the paired drop (n10 - n01) / n over n samples scored by both runs.

    n10 samples were right in the baseline and wrong now, n01 the reverse. Conditional on the
    D = n10 + n01 discordant pairs, n10 ~ Binomial(D, p) and the drop is (D / n) * (2p - 1), a
    monotone map of p; so the Wilson interval for p (the score-test inversion, as McNemar's test is
    the test on the same binomial) maps to an interval for the drop with the same coverage given D.
    Conditioning on D is what McNemar does too; it leaves out the sampling noise of D itself, which
    matters little once D is more than a handful. With D = 0 nothing changed: the interval is [0, 0].
    """
    if n <= 0 or n10 < 0 or n01 < 0 or n10 + n01 > n:
        raise ValueError(f"need 0 <= n10 + n01 <= n and n > 0, got n10={n10}, n01={n01}, n={n}")
    d = n10 + n01
    if d == 0:
        return (0.0, 0.0)
    lo, hi = wilson_interval(n10, d, z)
    return (d / n * (2 * lo - 1), d / n * (2 * hi - 1))


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
