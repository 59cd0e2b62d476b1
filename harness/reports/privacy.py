"""The privacy probes in the report: membership inference (rates with 95% intervals, a ROC curve on
log-log axes, the LiRA convention) and model extraction (fidelity and stolen accuracy against the
query budget, undefended and per output defense); the chart helpers the comparison shares."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from harness.reports.render import _FONT, _LEGEND_CHARS, _PALETTE, _is_number, _nice_step, _num, legend_entry

__all__ = ["roc_svg", "budget_svg", "roc_floor", "privacy_section"]


# --- charts on log or linear axes (privacy: ROC curves, fidelity against the query budget) -------

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_DASHES = ("", "6 4", "2 3", "8 3 2 3", "1 4")


def _power_label(v: float) -> str:
    """10^k as "10⁻²" (1 and 10 as themselves); any other value as %g."""
    k = round(math.log10(v))
    if abs(v - 10.0 ** k) > 1e-9 * v:
        return f"{v:g}"
    return "1" if k == 0 else "10" if k == 1 else f"10{str(k).translate(_SUPERSCRIPT)}"


def _count_label(v: float) -> str:
    return str(int(round(v))) if v >= 1 and abs(v - round(v)) < 1e-9 else f"{v:g}"


class _Axis:
    """One axis from lo to hi, linear or log10: where a value lands (0..1, clipped to the range) and its ticks."""

    def __init__(self, lo: float, hi: float, log: bool, ticks: list[tuple[float, str]], minor: list[float]) -> None:
        self.lo, self.hi, self.log, self.ticks, self.minor = lo, hi, log, ticks, minor

    def frac(self, v: float) -> float:
        v = min(max(v, self.lo), self.hi)
        if self.log:
            return (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return (v - self.lo) / (self.hi - self.lo)


def _log_axis(lo: float, hi: float, label=_power_label) -> _Axis:
    """Decade ticks labelled (with 2x and 5x too when fewer than three decades fit), the rest of 2..9x as grid."""
    k0, k1 = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    inside = lambda v: lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)
    decades = [10.0 ** k for k in range(k0, k1 + 1) if inside(10.0 ** k)]
    steps = [m * 10.0 ** k for k in range(k0, k1 + 1) for m in range(2, 10) if inside(m * 10.0 ** k)]
    labelled = sorted(decades + ([v for v in steps if round(v / 10.0 ** math.floor(math.log10(v) + 1e-9)) in (2, 5)]
                                 if len(decades) < 3 else []))
    return _Axis(lo, hi, True, [(v, label(v)) for v in labelled], [v for v in steps if v not in labelled])


def _linear_axis(hi: float, label=lambda v: f"{float(f'{v:.6g}'):g}") -> _Axis:
    step = _nice_step(hi) if hi > 0 else 0.25
    end = step * math.ceil(hi / step - 1e-9) if hi > 0 else 1.0
    return _Axis(0.0, end, False, [(i * step, label(i * step)) for i in range(int(round(end / step)) + 1)], [])


_UNIT = _Axis(0.0, 1.0, False, [(t / 5, f"{t / 5:.1f}") for t in range(6)], [])


def _plot_svg(title: str, lines: list[dict[str, Any]], xa: _Axis, ya: _Axis, *, x_label: str, y_label: str,
              plot_w: int = 380, plot_h: int = 250, diagonal: bool = False, references: Sequence[dict[str, Any]] = (),
              note: str = "") -> str:
    """A chart as inline SVG (no script, every label escaped): `lines` are {"name", "points": [(x, y)],
    "colour"?, "dash"?, "marks"?}; a point outside an axis is drawn at its end (clipped, never dropped).
    `diagonal` draws y = x (chance, on a ROC); `references` are horizontal dashed lines {"name", "y"}.
    The plot area is the rect of class "plot-area", so a reader (or a test) can map values to pixels."""
    from markupsafe import escape

    named = [(ln["name"], ln) for ln in lines] + [(r["name"], r) for r in references]
    shown = {n: n if len(n) <= _LEGEND_CHARS else n[:_LEGEND_CHARS - 1] + "…" for n, _ in named}
    left, top, bottom = 58, 34, 50 + (16 if note else 0)
    right = round(min(300, max(110, 52 + 7.2 * max((len(s) for s in shown.values()), default=0))))
    plot_h = max(plot_h, 40 + 18 * len(named))
    w, h = max(left + plot_w + right, round(16 + 6.4 * len(note))), top + plot_h + bottom
    sx = lambda x: left + plot_w * xa.frac(x)
    sy = lambda y: top + plot_h * (1 - ya.frac(y))
    base = top + plot_h
    out = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{escape(title)}" '
           f'font-family="{_FONT}" style="max-width:100%;height:auto">', f"<title>{escape(title)}</title>",
           f'<text x="{left}" y="18" font-size="14" font-weight="600" fill="#1f2328">{escape(title)}</text>',
           f'<rect class="plot-area" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="none"/>']
    for v in ya.minor:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eaeef2"/>')
    for v in xa.minor:
        out.append(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{top}" y2="{base}" stroke="#eaeef2"/>')
    for v, label in ya.ticks:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#d0d7de"/>'
                   f'<text class="ytick" x="{left - 6}" y="{sy(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#1f2328">{escape(label)}</text>')
    for v, label in xa.ticks:
        grid = f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{top}" y2="{base}" stroke="#d0d7de"/>' if xa.log else ""
        out.append(f'{grid}<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{base}" y2="{base + 4}" stroke="#57606a"/>'
                   f'<text class="xtick" x="{sx(v):.1f}" y="{base + 17}" font-size="11" text-anchor="middle" fill="#1f2328">{escape(label)}</text>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}" stroke="#57606a"/>'
               f'<line x1="{left}" x2="{left}" y1="{top}" y2="{base}" stroke="#57606a"/>'
               f'<text x="{left + plot_w / 2:.1f}" y="{base + 34}" font-size="12" text-anchor="middle" fill="#1f2328">{escape(x_label)}</text>'
               f'<text transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" font-size="12" text-anchor="middle" fill="#1f2328">{escape(y_label)}</text>')
    if note:
        out.append(f'<text class="note" x="8" y="{h - 6}" font-size="11" fill="#57606a">{escape(note)}</text>')
    if diagonal:
        lo, hi = max(xa.lo, ya.lo), min(xa.hi, ya.hi)
        out.append(f'<line class="chance" x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" '
                   f'stroke="#8c959f" stroke-width="1" stroke-dasharray="4 4"><title>chance (TPR = FPR)</title></line>')
    if not any(ln["points"] for ln in lines):
        out.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" font-size="12" text-anchor="middle" fill="#57606a">no points</text>')
    for i, (name, item) in enumerate(named):
        colour = item.get("colour") or _PALETTE[i % len(_PALETTE)]
        dash = f' stroke-dasharray="{item["dash"]}"' if item.get("dash") else ""
        if "y" in item:  # a reference level
            out.append(f'<line class="reference" x1="{left}" x2="{left + plot_w}" y1="{sy(item["y"]):.1f}" y2="{sy(item["y"]):.1f}" '
                       f'stroke="{colour}" stroke-width="1.5"{dash}><title>{escape(name)}: {item["y"]:.4f}</title></line>')
        else:
            pts = item["points"]
            if len(pts) > 1:
                path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
                out.append(f'<polyline data-line="{escape(name)}" points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            if item.get("marks", True) or len(pts) == 1:
                out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{colour}"><title>{escape(shown[name])} at '
                        f'{x:g}: {y:.4f}</title></circle>' for x, y in pts]
        out.append(legend_entry(i, top, left + plot_w, colour, dash, name, shown[name]))
    out.append("</svg>")
    return "".join(out)


def roc_floor(n_nonmembers: Any) -> float:
    """The lowest FPR a ROC chart shows: 1e-4, or 1/n for n non-member trials if that is larger (below
    it no rate can be measured), at most 0.1 so that a decade always shows."""
    n = n_nonmembers if _is_number(n_nonmembers) and n_nonmembers > 0 else 0
    return min(0.1, max(1e-4, 1.0 / n)) if n else 1e-4


def _floor_text(floor: float) -> str:
    """1e-4 as "10⁻⁴"; 1/5388 as "1/5388 ≈ 0.00019"."""
    if floor == 10.0 ** round(math.log10(floor)):
        return _power_label(floor)
    return f"1/{round(1 / floor)} ≈ {floor:.2g}"


def roc_svg(lines: dict[str, list[tuple[float, float]]], *, floor: float, title: str,
            marks: Sequence[tuple[str, float, float]] = (), colours: Optional[dict[str, str]] = None) -> str:
    """ROC curves (TPR against FPR) on log-log axes from `floor` to 1, the LiRA way, with the chance
    diagonal; one line per entry of `lines`. A point below `floor` on either axis (an FPR or TPR of 0)
    is drawn on the axis minimum and counted in a note. `marks` are operating points (name, fpr, tpr)."""
    pts = {k: [(float(x), float(y)) for x, y in v if _is_number(x) and _is_number(y)] for k, v in lines.items()}
    clipped = sum(x < floor or y < floor for v in pts.values() for x, y in v)
    axis = _log_axis(floor, 1.0)
    items = [{"name": k, "points": v, "marks": False, "colour": (colours or {}).get(k)} for k, v in pts.items()]
    items += [{"name": name, "points": [(fpr, tpr)], "colour": "#1f2328"} for name, fpr, tpr in marks
              if _is_number(fpr) and _is_number(tpr)]
    note = f"{clipped} point(s) below {_floor_text(floor)} (a rate of 0) drawn on the axis minimum" if clipped else ""
    return _plot_svg(title, items, axis, axis, x_label="false-positive rate (log)", y_label="true-positive rate (log)",
                     plot_w=300, plot_h=300, diagonal=True, note=note)


def budget_svg(lines: list[dict[str, Any]], *, title: str, y_label: str, references: Sequence[dict[str, Any]] = ()) -> str:
    """A rate against the query budget: one line per entry ({"name", "points": [(budget, rate)], "colour"?,
    "dash"?}); the budget axis is log10 when the budgets span more than 10x."""
    budgets = [x for ln in lines for x, _ in ln["points"] if _is_number(x) and x > 0]
    lo, hi = (min(budgets), max(budgets)) if budgets else (1.0, 1.0)
    if hi > 10 * lo:
        xa = _log_axis(10.0 ** math.floor(math.log10(lo) + 1e-9), 10.0 ** math.ceil(math.log10(hi) - 1e-9), _count_label)
    else:
        xa = _linear_axis(hi, _count_label)
    return _plot_svg(title, lines, xa, _UNIT, x_label="query budget" + (" (log)" if xa.log else ""), y_label=y_label,
                     references=references)


def _probe_ci(p: dict[str, Any], metric: str, intervals: dict[str, Any]) -> Any:
    """A privacy metric's 95% interval: its record's metric_intervals entry, else the scorecard's."""
    entry = (p.get("metric_intervals") or {}).get(metric)
    if isinstance(entry, dict) and isinstance(entry.get("ci95"), (list, tuple)):
        return entry["ci95"]
    return intervals.get(metric)


def _membership(p: dict[str, Any], intervals: dict[str, Any]) -> dict[str, Any]:
    """A membership-inference record as a table of its settings, its rates with their intervals and its ROC."""
    from markupsafe import Markup

    pid, metrics = str(p.get("id")), p.get("metrics") or {}
    value = lambda m, fallback: metrics[m] if _is_number(metrics.get(m)) else fallback
    rows = []
    for lv in p.get("levels") or []:
        m = f"tpr_at_fpr:{pid}@{lv.get('label')}"
        resolved = bool(lv.get("resolved"))
        note = (f"measured FPR {_num(lv.get('fpr_measured'))}, threshold {_num(lv.get('threshold'))}" if resolved
                else str(lv.get("why") or "too few non-member trials for this FPR"))
        rows.append({"label": f"TPR at FPR {lv.get('label')}", "metric": m, "resolved": resolved,
                     "value": value(m, lv.get("tpr")) if resolved else None, "ci": _probe_ci(p, m, intervals) if resolved else None, "note": note})
    for family, label, note in (("auc", "AUC", "area under the ROC curve; 0.5 is chance"),
                                ("advantage", "advantage", "max TPR − FPR over thresholds; 0 is chance")):
        m = f"{family}:{pid}"
        rows.append({"label": label, "metric": m, "resolved": True, "value": value(m, p.get(family)),
                     "ci": _probe_ci(p, m, intervals), "note": note})
    evaluation, calibration = p.get("evaluation") or {}, p.get("calibration") or {}
    floor = roc_floor(evaluation.get("n_nonmembers"))
    roc = p.get("roc") or {}
    curve = list(zip(roc.get("fpr") or [], roc.get("tpr") or []))
    marks = [(f"at FPR {lv.get('label')}", lv.get("fpr_measured"), lv.get("tpr"))
             for lv in p.get("levels") or [] if lv.get("resolved")]
    chart = Markup(roc_svg({"ROC (evaluation trials)": curve}, floor=floor, marks=marks,
                           title=f"{pid}: membership ROC, log-log"))
    settings = [("method", p.get("method")), ("variant", p.get("variant")), ("variance", p.get("variance")),
                ("target", p.get("target")), ("shadow models", p.get("shadow_models")), ("examples", p.get("n_examples")),
                ("trials", f"{_num(p.get('n_trials'))} ({_num(p.get('n_members'))} member, {_num(p.get('n_nonmembers'))} non-member)"),
                ("calibration trials", f"{_num(calibration.get('n_members'))} member, {_num(calibration.get('n_nonmembers'))} non-member"),
                ("evaluation trials", f"{_num(evaluation.get('n_members'))} member, {_num(evaluation.get('n_nonmembers'))} non-member")]
    acc = p.get("shadow_accuracy")
    if isinstance(acc, dict):
        settings.append(("shadow accuracy", f"members {_num(acc.get('members'), 3)}, non-members {_num(acc.get('nonmembers'), 3)}"))
    settings += [(k, p.get(key)) for k, key in (("keep file", "keep_file"), ("seconds", "seconds")) if p.get(key) is not None]
    return {"id": pid, "name": p.get("name"), "settings": [(k, v) for k, v in settings if v is not None], "rows": rows,
            "chart": chart, "floor": _floor_text(floor), "pooled": p.get("target") == "shadows"}


def _budget_key(b: Any) -> str:
    return str(int(b)) if _is_number(b) and float(b).is_integer() else str(b)


def _extraction(pid: str, recs: list[dict[str, Any]], intervals: dict[str, Any]) -> dict[str, Any]:
    """An extraction probe's records (one per budget) as fidelity and stolen-accuracy charts, one line per
    answer kind (undefended, each output defense), and a table per budget."""
    from markupsafe import Markup

    recs = sorted(recs, key=lambda r: r.get("budget") if _is_number(r.get("budget")) else 0)
    defenses = list(dict.fromkeys(str(d.get("defense")) for r in recs for d in r.get("defenses") or [] if isinstance(d, dict)))
    undefended = f"undefended ({recs[0].get('answers')})" if recs[0].get("answers") else "undefended"
    lines: dict[str, dict[str, list]] = {"fidelity": {}, "stolen_accuracy": {}}
    rows = []
    for r in recs:
        b = _budget_key(r.get("budget"))
        by = {str(d.get("defense")): d for d in r.get("defenses") or [] if isinstance(d, dict)}
        for key in lines:
            for kind, source in [(undefended, r)] + [(d, by.get(d)) for d in defenses]:
                if source is not None and _is_number(source.get(key)) and _is_number(r.get("budget")):
                    lines[key].setdefault(kind, []).append((r["budget"], source[key]))
        cells = []
        for d in defenses:
            e = by.get(d) or {}
            cells.append({"fidelity": e.get("fidelity"), "ci": _probe_ci(r, f"fidelity:{pid}/{d}@{b}", intervals) if e else None,
                          "drop": e.get("fidelity_drop"), "drop_ci": _probe_ci(r, f"fidelity_drop:{pid}/{d}@{b}", intervals) if e else None,
                          "cost": e.get("clean_accuracy_cost")})
        rows.append({"budget": r.get("budget"), "fidelity": r.get("fidelity"), "fidelity_ci": _probe_ci(r, f"fidelity:{pid}@{b}", intervals),
                     "stolen": r.get("stolen_accuracy"), "stolen_ci": _probe_ci(r, f"stolen_accuracy:{pid}@{b}", intervals),
                     "victim": r.get("victim_accuracy"), "defenses": cells})
    kinds = [undefended] + defenses
    style = lambda i: {"colour": _PALETTE[i % len(_PALETTE)], "dash": _DASHES[i % len(_DASHES)]}
    victim = next((r["victim_accuracy"] for r in recs if _is_number(r.get("victim_accuracy"))), None)
    charts = []
    for key, label in (("fidelity", "fidelity (agreement with the victim)"), ("stolen_accuracy", "stolen model's accuracy")):
        items = [{"name": k, "points": lines[key].get(k, []), **style(i)} for i, k in enumerate(kinds)]
        refs = [{"name": "victim accuracy", "y": victim, "colour": "#1f2328", "dash": "3 3"}] if key == "stolen_accuracy" and victim is not None else []
        charts.append((key, Markup(budget_svg(items, title=f"{pid}: {label.split(' (')[0]} against the query budget",
                                              y_label=label, references=refs))))
    first = recs[0]
    return {"id": pid, "name": first.get("name"), "queries": first.get("queries"), "answers": first.get("answers"),
            "thief": first.get("thief"), "n_test": first.get("n_test"), "defenses": defenses, "charts": charts, "rows": rows}


STOPPED = {"throttled": "throttled", "refused": "refused", "burst": "the whole burst was answered",
           "time": "the time limit (within) ran out"}


def _rate_limit(p: dict[str, Any], intervals: dict[str, Any]) -> dict[str, Any]:
    """One rate-limit probe: what the burst sent, where it was stopped and how."""
    first = p.get("first_throttle") or {}
    metric = f"throttled_after:{p.get('id')}"
    how = None
    if first:
        how = f"HTTP {first['status']}" if first.get("status") is not None else (first.get("detail") or "refused")
        if first.get("retry_after") is not None:
            how += f", Retry-After {first['retry_after']}"
    return {"id": p.get("id"), "name": p.get("name"), "metric": metric, "value": (p.get("metrics") or {}).get(metric),
            "ci": _probe_ci(p, metric, intervals), "throttled": bool(p.get("throttled")),
            "stopped": STOPPED.get(str(p.get("stopped")), p.get("stopped")), "how": how, "at_request": first.get("request"),
            "at_seconds": first.get("seconds"),
            "settings": [("burst (requests at most)", p.get("burst")), ("images per request", p.get("images_per_request")),
                         ("within (seconds at most)", p.get("within")), ("pace", "as fast as answered" if p.get("rate") is None
                                                                          else f"{p.get('rate')} requests per second"),
                         ("this run's requests before the burst", p.get("requests_before")),
                         ("requests sent", p.get("requests_sent")), ("answered", p.get("answered")),
                         ("seconds", p.get("seconds")), ("answered per second", p.get("answered_per_second"))]}


def privacy_section(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Membership inference (per probe: its rates with 95% intervals and a log-log ROC), model extraction
    (per probe: fidelity and stolen accuracy against the query budget, undefended and per output defense)
    and an endpoint's rate limiting (per probe: the burst and where it was throttled)."""
    records = [p for p in record.get("probes") or [] if isinstance(p, dict) and p.get("kind") in ("membership", "extraction", "rate-limit")]
    if not records:
        return None
    intervals = record.get("intervals") or {}
    extraction: dict[str, list[dict[str, Any]]] = {}
    for p in records:
        if p["kind"] == "extraction":
            extraction.setdefault(str(p.get("id")), []).append(p)
    return {"membership": [_membership(p, intervals) for p in records if p["kind"] == "membership"],
            "extraction": [_extraction(pid, recs, intervals) for pid, recs in extraction.items()],
            "rate_limit": [_rate_limit(p, intervals) for p in records if p["kind"] == "rate-limit"]}
