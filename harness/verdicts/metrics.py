"""The counts and 95% intervals behind each metric of a scorecard record.

The statistics themselves are harness.core.stats, metric ids harness.core.ids, the ids a suite will
produce harness.config.metric_ids; their names stay importable from here."""

from __future__ import annotations

import math
from typing import Any, Optional

from harness.core.curves import curves
from harness.core.ids import metric_id
from harness.core.stats import (Z95, auroc_interval, mcnemar_p_value, median_interval, newcombe_interval, paired_drop_interval,
                                wilson_interval)

__all__ = ["metric_id", "suite_metric_ids", "worst_groups", "wilson_interval", "metric_counts", "metric_intervals",
           "interval_methods", "entry_epsilons", "curves",
           "mcnemar_p_value", "paired_drop_interval", "newcombe_interval", "auroc_interval", "median_interval", "Z95"]

_CONFIG_LEVEL = ("entry_epsilons", "suite_metric_ids", "worst_groups")


def __getattr__(name: str) -> Any:
    # the ids a suite produces live in the config layer (below this one); importing it lazily keeps
    # pydantic out of a process that only reads records
    if name in _CONFIG_LEVEL:
        from harness.config import metric_ids

        return getattr(metric_ids, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    for key in ("attacks", "defenses", "probes", "certificates"):
        walk(card.get(key, []))
    return out


def _fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _end(v: Any) -> Optional[float]:
    """One end of an interval: a number, or "inf"/"-inf" as a scorecard file writes an infinite end."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
        return float(v)
    return float(v) if v in ("inf", "-inf") else None


def _ci95(entry: dict[str, Any]) -> Optional[list[float]]:
    ci = entry.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_end(v) is not None for v in ci):
        return [_end(ci[0]), _end(ci[1])]  # type: ignore[list-item]
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
    "n": 0 for a producer's metric measured on no sample, and {"method": "absent", "why"} for one its
    producer names but could not measure (a gate on it is inconclusive, and says why)."""
    counts = metric_counts(card)
    produced = _producer_intervals(card)
    out: dict[str, dict[str, str]] = {}
    for m, value in card.get("metrics", {}).items():
        entry = produced.get(m)
        if entry is not None and _ci95(entry) is not None:
            out[m] = {"method": str(entry.get("method") or "interval")}
            if entry.get("alpha") is not None:  # a certificate's per-point failure probability, stated beside its interval
                out[m]["alpha"] = entry["alpha"]
            if entry.get("n") == 0:  # kept so a gate knows nothing was measured
                out[m]["n"] = 0
        elif entry is not None:
            out[m] = {"method": "point", "why": str(entry.get("why") or "its producer computes no interval for it")}
        elif m in counts and (counts[m] == 0 or _fraction(value)):
            out[m] = {"method": "wilson"}
        else:
            out[m] = {"method": "point", "why": "no sample count or interval is recorded for this metric"}
    for m, entry in produced.items():  # a metric its producer left out on purpose (an FPR too low to resolve)
        if m not in out and entry.get("method") == "absent":
            out[m] = {"method": "absent", "why": str(entry.get("why") or "its producer could not measure it")}
    return out


