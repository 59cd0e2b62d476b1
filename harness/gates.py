"""Gates: judge metrics against thresholds and a baseline; a pure function over records."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .config import GateConfig
from .metrics import wilson_interval

__all__ = ["judge_gates", "overall_verdict", "gates_from_records"]

_EPS = 1e-12


def judge_gates(gates: Sequence[GateConfig], metrics: dict[str, float], counts: dict[str, int],
                baseline: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
    out = []
    for g in gates:
        value = metrics.get(g.metric)
        n = counts.get(g.metric)
        ci95 = None
        if value is not None and n:
            lo, hi = wilson_interval(round(value * n), n)
            ci95 = [round(lo, 6), round(hi, 6)]
        base = None if baseline is None else baseline.get(g.metric)
        rec: dict[str, Any] = {"metric": g.metric, "value": value, "ci95": ci95, "baseline": base}
        if g.min is not None:
            rec.update(op=">=", threshold=g.min)
        elif g.max is not None:
            rec.update(op="<=", threshold=g.max)
        else:
            rec.update(op="max_drop", threshold=g.max_drop)
        if value is None:
            rec.update(passed=False, verdict="inconclusive", reason="the metric was not produced by this run")
        elif rec["op"] == ">=":
            ok = value >= g.min - _EPS
            rec.update(passed=ok, verdict="pass" if ok else "fail",
                       reason="" if ok else f"{value:.4f} is below the minimum {g.min} by {g.min - value:.4f}")
        elif rec["op"] == "<=":
            ok = value <= g.max + _EPS
            rec.update(passed=ok, verdict="pass" if ok else "fail",
                       reason="" if ok else f"{value:.4f} is above the maximum {g.max} by {value - g.max:.4f}")
        elif base is None:
            why = "no --baseline scorecard was given" if baseline is None else "the baseline scorecard has no such metric"
            rec.update(passed=False, verdict="inconclusive", reason=f"max_drop needs a baseline: {why}")
        else:
            drop = base - value
            ok = drop <= g.max_drop + _EPS
            rec.update(passed=ok, verdict="pass" if ok else "fail", delta=value - base,
                       reason="" if ok else f"dropped {drop:.4f} from the baseline {base:.4f}, more than the allowed {g.max_drop}")
        out.append(rec)
    return out


def overall_verdict(gates: Sequence[dict[str, Any]], checks: Sequence[dict[str, Any]]) -> tuple[bool, str]:
    """fail if any gate or check failed; inconclusive if a gate could not be judged; else pass."""
    if any(c["status"] == "fail" for c in checks) or any(g["verdict"] == "fail" for g in gates):
        return False, "fail"
    if any(g["verdict"] == "inconclusive" for g in gates):
        return False, "inconclusive"
    return True, "pass"


def gates_from_records(records: Sequence[dict[str, Any]]) -> list[GateConfig]:
    """The gate definitions a scorecard was judged with, to judge it again."""
    key = {">=": "min", "<=": "max", "max_drop": "max_drop"}
    return [GateConfig(metric=r["metric"], **{key[r["op"]]: r["threshold"]}) for r in records]
