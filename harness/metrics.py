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
        if a.get("norm") is not None:
            counts[metric_id("attack_success_rate", a["id"], a["epsilon"])] = int(a["n_attacked"])
    for m in card.get("metrics", {}):
        if m.startswith("robust_accuracy:worst-"):
            counts[m] = n
    return counts


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
