"""Gates: judge metrics against thresholds and a baseline, with their sampling uncertainty; pure functions.

A min/max gate is judged on the metric's 95% interval (Wilson on its sample count, or the interval its
producer recorded: AUROC score, order statistics of a median, ...): `pass` when the whole interval is on
the right side of the threshold, `fail` when it is wholly on the wrong side, `inconclusive` when the
threshold lies inside it. A metric with no interval is judged on its point value, and its record says so
(`interval_method: point` and why). A metric measured on no sample is inconclusive, never a pass. A
max_drop gate is judged on a 95% interval for the drop from the baseline: Tango's paired score interval
(with McNemar's exact p beside it) when `harness.verdicts.outcomes.pairing` finds both runs scored the same
samples, else Newcombe's unpaired interval; the record says which (`pairing`). A max_drop gate without
a baseline value, and a value that is not a number, fail: they are errors, not noise. Whether an
inconclusive gate passes is the policy `on_inconclusive` (the gate's own, else the config's).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

from harness.config import GateConfig
from harness.core.stats import mcnemar_p_value, newcombe_interval, paired_drop_interval, wilson_interval

if TYPE_CHECKING:  # pragma: no cover
    from harness.verdicts.outcomes import Outcomes

__all__ = ["judge_gates", "overall_verdict", "gates_from_records", "POLICIES", "MAX_FLIPPED_LISTED"]

_EPS = 1e-12  # a value equal to its threshold up to float noise is on the threshold
POLICIES = ("fail", "pass")
MAX_FLIPPED_LISTED = 20
_NO_INTERVAL = "no sample count or interval is recorded for this metric"


def _ci(lo: float, hi: float) -> str:
    return f"95% CI [{lo:.4f}, {hi:.4f}]"


def _verdict(lo: float, hi: float, ok_below: float) -> str:
    """pass when [lo, hi] lies wholly at or below `ok_below`, fail when wholly above, else inconclusive."""
    if hi <= ok_below + _EPS:
        return "pass"
    if lo > ok_below + _EPS:
        return "fail"
    return "inconclusive"


def _is_nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _interval_of(metric: str, value: float, n: Optional[int], intervals: Optional[dict], methods: Optional[dict]
                 ) -> tuple[Optional[tuple[float, float]], str, str]:
    """(interval or None, its method, why there is none) for a min/max gate's metric."""
    method_of = (methods or {}).get(metric) or {}
    if n == 0:
        return (0.0, 1.0), "wilson", ""
    if intervals and intervals.get(metric) is not None:
        lo, hi = intervals[metric]
        return (float(lo), float(hi)), str(method_of.get("method") or ("wilson" if n else "interval")), ""
    if n and 0.0 <= value <= 1.0:
        return wilson_interval(round(value * n), n), "wilson", ""
    return None, "point", str(method_of.get("why") or _NO_INTERVAL)


def _bound(g: GateConfig, value: float, n: Optional[int], interval: Optional[tuple[float, float]], method: str,
           why_point: str) -> dict[str, Any]:
    """A min or max gate. Both are judged as "value * sign <= threshold * sign", sign -1 for a min."""
    is_min = g.min is not None
    t = g.min if is_min else g.max
    sign = -1.0 if is_min else 1.0
    side, gap = ("below the minimum", t - value) if is_min else ("above the maximum", value - t)
    if n == 0:  # nothing was measured: no value, however it compares, can vouch for the gate
        return {"verdict": "inconclusive", "reason": "nothing was measured: the metric rests on 0 samples, its interval is [0, 1]"}
    lo, hi = interval if interval is not None else (value, value)
    verdict = _verdict(*sorted((sign * lo, sign * hi)), sign * t)
    on = f"on {n} samples" if n and method == "wilson" else f"({method})"
    if verdict == "pass":
        reason = ""
    elif verdict == "fail" and method == "lower-bound":
        reason = f"at least {lo:g} (a lower bound: the value lies in [{lo:g}, {hi:g}]), {side} {t}"
    elif verdict == "fail":
        reason = f"{value:.4f} is {side} {t} by {gap:.4f}"
        if interval is not None:
            reason += f" ({_ci(lo, hi)} {on})"
    elif method == "lower-bound":  # an unthrottled burst: the count shows only where the value starts
        reason = (f"{value:g} is only a lower bound (the value lies in [{lo:g}, {hi:g}]): it cannot be told apart from "
                  f"the {'minimum' if is_min else 'maximum'} {t}; a larger measurement (a longer burst) would decide")
    else:
        reason = (f"the {'minimum' if is_min else 'maximum'} {t} lies inside the {_ci(lo, hi)} of {value:.4f} "
                  f"{on}: too few samples to tell")
    if interval is None:
        reason = (reason + "; " if reason else "") + f"judged on its point value: {why_point}"
    return {"verdict": verdict, "reason": reason}


def _drop(g: GateConfig, value: float, base: float, n: Optional[int], base_n: Optional[int],
          outcomes: Optional["Outcomes"], baseline_outcomes: Optional["Outcomes"]) -> dict[str, Any]:
    """A max_drop gate against a baseline value: paired when `pairing` finds the same samples on both sides."""
    from harness.verdicts.outcomes import pairing

    rec: dict[str, Any] = {"delta": value - base}
    paired, why = pairing(outcomes, baseline_outcomes, g.min_overlap if g.min_overlap is not None else 1.0)
    if paired and not (g.metric in outcomes and g.metric in baseline_outcomes):
        paired, why = False, f"no per-sample outcomes for {g.metric} on both sides"
    rec["pairing"] = "paired" if paired else f"unpaired: {why}"
    if paired:
        _, n10, n01, _ = counts = outcomes.pairs(baseline_outcomes, g.metric)
        pairs = sum(counts)
        drop = (n10 - n01) / pairs
        lo, hi = paired_drop_interval(n10, n01, pairs)
        p = mcnemar_p_value(n10, n01)
        worse, better = outcomes.flipped(baseline_outcomes, g.metric)
        rec.update(test="mcnemar", interval_method="tango-score", n_pairs=pairs, n10=n10, n01=n01, p_value=float(f"{p:.6g}"),
                   flipped={"worse": worse[:MAX_FLIPPED_LISTED].tolist(), "better": better[:MAX_FLIPPED_LISTED].tolist(),
                            "n_worse": n10, "n_better": n01})
        detail = f"{n10} of {pairs} paired samples got worse and {n01} better, McNemar p={p:.4g}"
    elif n == 0 or base_n == 0:
        drop, lo, hi = base - value, -1.0, 1.0
        rec.update(test="unpaired", interval_method="newcombe")
        detail = f"nothing was measured: {n if n == 0 else base_n} samples on the {'current' if n == 0 else 'baseline'} side"
    elif n and base_n and 0.0 <= value <= 1.0 and 0.0 <= base <= 1.0:
        drop = base - value
        lo, hi = newcombe_interval(round(base * base_n), base_n, round(value * n), n)
        rec.update(test="unpaired", interval_method="newcombe")
        detail = f"unpaired ({why}): {base_n} baseline and {n} current samples"
    else:
        drop, lo, hi = base - value, base - value, base - value
        rec.update(test="point", interval_method="point")
        detail = f"judged on its point value: no sample counts to give the drop an interval; {rec['pairing']}"
    rec.update(drop=round(drop, 6), drop_ci95=None if rec["test"] == "point" else [round(lo, 6), round(hi, 6)])
    verdict = "inconclusive" if n == 0 or base_n == 0 else _verdict(lo, hi, g.max_drop)
    if verdict == "pass":
        reason = detail if rec["test"] == "point" else ""
    elif verdict == "fail":
        reason = f"dropped {drop:.4f} from the baseline {base:.4f}, more than the allowed {g.max_drop}"
        reason += f" ({detail})" if rec["test"] == "point" else f" ({_ci(lo, hi)} of the drop; {detail})"
    else:
        reason = (f"dropped {drop:.4f} from the baseline {base:.4f}; the allowed drop {g.max_drop} lies inside "
                  f"the drop's {_ci(lo, hi)}; {detail}")
    rec.update(verdict=verdict, reason=reason)
    return rec


def _missing_baseline(g: GateConfig, baseline: Optional[dict[str, float]]) -> Optional[str]:
    """Why a max_drop gate has no baseline value to compare with, or None when it has one."""
    if baseline is None:
        return "no --baseline scorecard was given"
    if g.metric not in baseline:
        return f"the baseline scorecard has no metric {g.metric}"
    if _is_nan(baseline[g.metric]):
        return f"the baseline's {g.metric} is not a number"
    return None


def judge_gates(gates: Sequence[GateConfig], metrics: dict[str, float], counts: dict[str, int],
                baseline: Optional[dict[str, float]] = None, *, outcomes: Optional["Outcomes"] = None,
                baseline_outcomes: Optional["Outcomes"] = None, baseline_counts: Optional[dict[str, int]] = None,
                on_inconclusive: str = "fail", intervals: Optional[dict[str, Sequence[float]]] = None,
                interval_methods: Optional[dict[str, dict[str, str]]] = None) -> list[dict[str, Any]]:
    """One record per gate: value, ci95, interval_method, verdict (pass|fail|inconclusive), passed, reason, policy.

    `counts` (and `baseline_counts`) give the samples behind each fraction metric; `intervals`
    (harness.verdicts.metrics.metric_intervals) and `interval_methods` (harness.verdicts.metrics.interval_methods) give
    every metric's 95% interval and how it was made. A metric with neither is judged on its point value.
    `outcomes`/`baseline_outcomes` (harness.verdicts.outcomes.Outcomes) make max_drop a paired test when
    harness.verdicts.outcomes.pairing accepts them. An inconclusive gate passes only under the policy "pass"; a
    gate whose metric this run did not produce never passes; a NaN value or a missing baseline fails.
    """
    if on_inconclusive not in POLICIES:
        raise ValueError(f"on_inconclusive must be one of {', '.join(POLICIES)}, got {on_inconclusive!r}")
    out = []
    for g in gates:
        policy, source = (g.on_inconclusive, "gate") if g.on_inconclusive is not None else (on_inconclusive, "config")
        produced = g.metric in metrics
        value = metrics.get(g.metric)
        nan = produced and _is_nan(value)
        n = counts.get(g.metric)
        if n is None and ((interval_methods or {}).get(g.metric) or {}).get("n") == 0:
            n = 0  # a producer's metric measured on no sample
        interval, method, why_point = (None, "point", "") if value is None or nan else \
            _interval_of(g.metric, value, n, intervals, interval_methods)
        base = None if baseline is None else baseline.get(g.metric)
        rec: dict[str, Any] = {"metric": g.metric, "value": value,
                               "ci95": None if interval is None else [round(v, 6) if math.isfinite(v) else v for v in interval],
                               "interval_method": method, "baseline": base}
        if why_point:
            rec["interval_why"] = why_point
        if g.min is not None:
            rec.update(op=">=", threshold=g.min)
        elif g.max is not None:
            rec.update(op="<=", threshold=g.max)
        else:
            rec.update(op="max_drop", threshold=g.max_drop)
            if g.min_overlap is not None:
                rec["min_overlap"] = g.min_overlap
        rec.update(on_inconclusive=policy, on_inconclusive_from=source)
        warning = _non_adaptive_warning(g.metric)
        if warning:
            rec["warning"] = warning
        if not produced:
            absent = ((interval_methods or {}).get(g.metric) or {}).get("why")
            rec.update(verdict="inconclusive", reason="the metric was not produced by this run" + (f": {absent}" if absent else ""))
        elif nan:
            rec.update(verdict="fail", reason=f"the value of {g.metric} is not a number (NaN): nothing can vouch for it")
        elif rec["op"] != "max_drop":
            rec.update(_bound(g, value, n, interval, method, why_point))
        elif _missing_baseline(g, baseline) is not None:
            rec.update(verdict="fail", reason=f"max_drop needs a baseline value: {_missing_baseline(g, baseline)}")
        else:
            base_n = None if baseline_counts is None else baseline_counts.get(g.metric)
            rec.update(_drop(g, value, base, n, base_n, outcomes, baseline_outcomes))
        empty = n == 0 or (rec["op"] == "max_drop" and (baseline_counts or {}).get(g.metric) == 0)
        if rec["verdict"] == "inconclusive" and empty:
            rec["passed"] = False  # nothing measured vouches for nothing, whatever the policy
            rec["reason"] += " (measured on no sample: never a pass, whatever on_inconclusive says)"
        elif rec["verdict"] == "inconclusive":
            rec["passed"] = produced and policy == "pass"
            if produced:
                rec["reason"] += f" (on_inconclusive: {policy})"
        else:
            rec["passed"] = rec["verdict"] == "pass"
        out.append(rec)
    return out


def _non_adaptive_warning(metric: str) -> str:
    """A gate on a defense judged by attacks that do not know it is there vouches for little: say so."""
    family, _, rest = metric.partition(":")
    subject, _, eps = rest.partition("@")
    prefix, _, attack = subject.partition("/")
    if family in ("detection_rate", "auroc") and attack.startswith("worst-"):
        better = f"{family}:{prefix}/adaptive-{attack.removeprefix('worst-')}@{eps}"
        return (f"judged against attacks that do not know the detector is there; gate on {better} "
                f"(or evasion_rate:{prefix}/adaptive-{attack.removeprefix('worst-')}@{eps}) for the adaptive figure")
    if prefix.endswith("-naive") and attack:
        return (f"judged against attacks that do not adapt to the {prefix.removesuffix('-naive')} defense; gate on "
                f"{family}:{prefix.removesuffix('-naive')}/{attack}@{eps} for the adaptive (BPDA/EOT) figure")
    return ""


def overall_verdict(gates: Sequence[dict[str, Any]], checks: Sequence[dict[str, Any]]) -> tuple[bool, str]:
    """fail if any gate or check failed; inconclusive if a gate could not be told apart from its
    threshold; else pass. An inconclusive run passes when each inconclusive gate passed by its policy."""
    if any(c["status"] == "fail" for c in checks) or any(g["verdict"] == "fail" for g in gates):
        return False, "fail"
    undecided = [g for g in gates if g["verdict"] == "inconclusive"]
    if undecided:
        return all(bool(g.get("passed")) for g in undecided), "inconclusive"
    return True, "pass"


def gates_from_records(records: Sequence[dict[str, Any]]) -> list[GateConfig]:
    """The gate definitions a scorecard was judged with, to judge it again.

    A gate's own `on_inconclusive` comes back; one it inherited from the config does not, so the
    record-level policy (or a new one) still applies when the card is judged again.
    """
    key = {">=": "min", "<=": "max", "max_drop": "max_drop"}
    out = []
    for r in records:
        kw: dict[str, Any] = {key[r["op"]]: r["threshold"]}
        if r.get("on_inconclusive") is not None and r.get("on_inconclusive_from", "gate") == "gate":
            kw["on_inconclusive"] = r["on_inconclusive"]
        if r.get("min_overlap") is not None:
            kw["min_overlap"] = r["min_overlap"]
        out.append(GateConfig(metric=r["metric"], **kw))
    return out
