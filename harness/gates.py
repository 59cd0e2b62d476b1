"""Gates: judge metrics against thresholds and a baseline, with their sampling uncertainty; pure functions.

A min/max gate is judged on the metric's 95% Wilson interval: `pass` when the whole interval is on
the right side of the threshold, `fail` when it is wholly on the wrong side, `inconclusive` when the
threshold lies inside it. A max_drop gate is judged on a 95% interval for the drop from the baseline:
paired (McNemar) when both runs carry per-sample outcomes, else unpaired (Newcombe). Whether an
inconclusive gate passes is the policy `on_inconclusive` (the gate's own, else the config's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

from .config import GateConfig
from .metrics import mcnemar_p_value, newcombe_interval, paired_drop_interval, wilson_interval

if TYPE_CHECKING:  # pragma: no cover
    from .outcomes import Outcomes

__all__ = ["judge_gates", "overall_verdict", "gates_from_records", "POLICIES", "MAX_FLIPPED_LISTED"]

_EPS = 1e-12  # a value equal to its threshold up to float noise is on the threshold
POLICIES = ("fail", "pass")
MAX_FLIPPED_LISTED = 20


def _ci(lo: float, hi: float) -> str:
    return f"95% CI [{lo:.4f}, {hi:.4f}]"


def _verdict(lo: float, hi: float, ok_below: float) -> str:
    """pass when [lo, hi] lies wholly at or below `ok_below`, fail when wholly above, else inconclusive."""
    if hi <= ok_below + _EPS:
        return "pass"
    if lo > ok_below + _EPS:
        return "fail"
    return "inconclusive"


def _bound(g: GateConfig, value: float, n: Optional[int], interval: Optional[tuple[float, float]]) -> dict[str, Any]:
    """A min or max gate. Both are judged as "value * sign <= threshold * sign", sign -1 for a min."""
    is_min = g.min is not None
    t = g.min if is_min else g.max
    sign = -1.0 if is_min else 1.0
    lo, hi = interval if interval is not None else (value, value)  # no count: the point comparison
    verdict = _verdict(*sorted((sign * lo, sign * hi)), sign * t)
    side, gap = ("below the minimum", t - value) if is_min else ("above the maximum", value - t)
    if verdict == "pass":
        reason = ""
    elif verdict == "fail":
        reason = f"{value:.4f} is {side} {t} by {gap:.4f}"
        if interval is not None:
            reason += f" ({_ci(lo, hi)} on {n} samples)"
    else:
        reason = (f"the {'minimum' if is_min else 'maximum'} {t} lies inside the {_ci(lo, hi)} of {value:.4f} "
                  f"on {n} samples: too few samples to tell")
    return {"verdict": verdict, "reason": reason}


def _drop(g: GateConfig, value: float, base: float, n: Optional[int], base_n: Optional[int],
          outcomes: Optional["Outcomes"], baseline_outcomes: Optional["Outcomes"]) -> dict[str, Any]:
    """A max_drop gate against a baseline value: paired when both sides carry per-sample outcomes."""
    rec: dict[str, Any] = {"delta": value - base}
    paired = (outcomes is not None and baseline_outcomes is not None
              and g.metric in outcomes and g.metric in baseline_outcomes)
    counts = outcomes.pairs(baseline_outcomes, g.metric) if paired else None
    if counts is not None and sum(counts):
        _, n10, n01, _ = counts
        pairs = sum(counts)
        drop = (n10 - n01) / pairs
        lo, hi = paired_drop_interval(n10, n01, pairs)
        p = mcnemar_p_value(n10, n01)
        worse, better = outcomes.flipped(baseline_outcomes, g.metric)
        rec.update(test="mcnemar", n_pairs=pairs, n10=n10, n01=n01, p_value=float(f"{p:.6g}"),
                   flipped={"worse": worse[:MAX_FLIPPED_LISTED].tolist(), "better": better[:MAX_FLIPPED_LISTED].tolist(),
                            "n_worse": n10, "n_better": n01})
        detail = f"{n10} of {pairs} paired samples got worse and {n01} better, McNemar p={p:.4g}"
    elif n and base_n:
        drop = base - value
        lo, hi = newcombe_interval(round(base * base_n), base_n, round(value * n), n)
        rec.update(test="unpaired")
        detail = f"unpaired: {base_n} baseline and {n} current samples, no per-sample outcomes to pair"
    else:
        drop, lo, hi = base - value, base - value, base - value
        rec.update(test="point")
        detail = ""
    rec.update(drop=round(drop, 6), drop_ci95=None if rec["test"] == "point" else [round(lo, 6), round(hi, 6)])
    verdict = _verdict(lo, hi, g.max_drop)
    if verdict == "pass":
        reason = ""
    elif verdict == "fail":
        reason = f"dropped {drop:.4f} from the baseline {base:.4f}, more than the allowed {g.max_drop}"
        if detail:
            reason += f" ({_ci(lo, hi)} of the drop; {detail})"
    else:
        reason = (f"dropped {drop:.4f} from the baseline {base:.4f}; the allowed drop {g.max_drop} lies inside "
                  f"the drop's {_ci(lo, hi)}; {detail}")
    rec.update(verdict=verdict, reason=reason)
    return rec


def judge_gates(gates: Sequence[GateConfig], metrics: dict[str, float], counts: dict[str, int],
                baseline: Optional[dict[str, float]] = None, *, outcomes: Optional["Outcomes"] = None,
                baseline_outcomes: Optional["Outcomes"] = None, baseline_counts: Optional[dict[str, int]] = None,
                on_inconclusive: str = "fail") -> list[dict[str, Any]]:
    """One record per gate: value, ci95, verdict (pass|fail|inconclusive), passed, reason, policy.

    `counts` (and `baseline_counts`) give the samples behind each fraction metric; a metric without
    one is judged on its point value. `outcomes`/`baseline_outcomes` (harness.outcomes.Outcomes)
    make max_drop a paired test over the sample ids both runs share. An inconclusive gate passes
    only under the policy "pass"; a gate whose metric this run did not produce never passes.
    """
    if on_inconclusive not in POLICIES:
        raise ValueError(f"on_inconclusive must be one of {', '.join(POLICIES)}, got {on_inconclusive!r}")
    out = []
    for g in gates:
        policy, source = (g.on_inconclusive, "gate") if g.on_inconclusive is not None else (on_inconclusive, "config")
        value = metrics.get(g.metric)
        n = counts.get(g.metric)
        interval = wilson_interval(round(value * n), n) if value is not None and n else None
        base = None if baseline is None else baseline.get(g.metric)
        rec: dict[str, Any] = {"metric": g.metric, "value": value,
                               "ci95": None if interval is None else [round(interval[0], 6), round(interval[1], 6)],
                               "baseline": base}
        if g.min is not None:
            rec.update(op=">=", threshold=g.min)
        elif g.max is not None:
            rec.update(op="<=", threshold=g.max)
        else:
            rec.update(op="max_drop", threshold=g.max_drop)
        rec.update(on_inconclusive=policy, on_inconclusive_from=source)
        if value is None:
            rec.update(verdict="inconclusive", reason="the metric was not produced by this run")
        elif rec["op"] != "max_drop":
            rec.update(_bound(g, value, n, interval))
        elif base is None:
            why = "no --baseline scorecard was given" if baseline is None else "the baseline scorecard has no such metric"
            rec.update(verdict="inconclusive", reason=f"max_drop needs a baseline: {why}")
        else:
            base_n = None if baseline_counts is None else baseline_counts.get(g.metric)
            rec.update(_drop(g, value, base, n, base_n, outcomes, baseline_outcomes))
        if rec["verdict"] == "inconclusive":
            rec["passed"] = value is not None and policy == "pass"
            if value is not None:
                rec["reason"] += f" (on_inconclusive: {policy})"
        else:
            rec["passed"] = rec["verdict"] == "pass"
        out.append(rec)
    return out


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
        out.append(GateConfig(metric=r["metric"], **kw))
    return out
