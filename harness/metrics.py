"""Metric ids (`family:subject@parameter`), the ids a suite will produce, and confidence intervals."""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["metric_id", "suite_metric_ids", "worst_groups", "wilson_interval", "metric_counts"]


def metric_id(family: str, subject: Optional[str] = None, parameter: Optional[str] = None) -> str:
    out = family
    if subject is not None:
        out += f":{subject}"
    if parameter is not None:
        out += f"@{parameter}"
    return out


def worst_groups(attacks) -> dict[tuple[str, float], str]:
    """(norm, epsilon value) -> the epsilon's label, as first written in the config."""
    groups: dict[tuple[str, float], str] = {}
    for a in attacks:
        for eps in a.epsilons:
            groups.setdefault((a.norm, eps.value), eps.label)
    return groups


def suite_metric_ids(config) -> list[str]:
    ids = ["clean_accuracy"]
    for a in config.attacks:
        for eps in a.epsilons:
            ids.append(metric_id("robust_accuracy", a.attack_id, eps.label))
            ids.append(metric_id("attack_success_rate", a.attack_id, eps.label))
    for (norm, _), label in worst_groups(config.attacks).items():
        ids.append(metric_id("robust_accuracy", f"worst-{norm}", label))
    return ids


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
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
    for a in card.get("attacks", []):
        counts[metric_id("robust_accuracy", a["id"], a["epsilon"])] = int(a["n"])
        counts[metric_id("attack_success_rate", a["id"], a["epsilon"])] = int(a["n_attacked"])
    for m in card.get("metrics", {}):
        if m.startswith("robust_accuracy:worst-"):
            counts[m] = n
    return counts
