"""Certified robustness in the report: per `certificates:` entry, certified accuracy against the radius
(L2, randomized smoothing) or epsilon (L-inf, interval bounds) beside the empirical robust accuracy an
attack leaves at each level, a table of the levels with their 95% intervals, and the soundness check;
and the same per certificate id across versions for `harness compare`.

Certified accuracy is a lower bound on robust accuracy and the attack's figure an upper bound: the gap
between the two lines is what the certificate leaves unproven, and a certified point the attack breaks
(a violation) is what the soundness check counts."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from harness.core.ids import metric_id
from harness.reports.privacy import _DASHES, _UNIT, _linear_axis, _plot_svg, _probe_ci
from harness.reports.render import _PALETTE, _is_number

__all__ = ["certified_svg", "step_points", "certificates_section", "compare_certificates", "compare_svg"]

_EMPIRICAL_DASH = _DASHES[1]


def step_points(points: Sequence[tuple[float, float]], end: Optional[float] = None) -> list[tuple[float, float]]:
    """A certified-accuracy curve sampled at radii r0 < r1 < ... as the step it is, drawn the
    conservative way: on (r_i, r_i+1] the value at r_i+1 (no point is certified beyond its own radius,
    so between two recorded radii the curve is at least the later value). With `end`, the last radius
    is taken as the largest certified one (smoothing's curve records it): the curve drops to 0 there
    and runs at 0 to `end`. Example: step_points([(0, .9), (.5, .6)], end=1) ==
    [(0, .9), (0, .6), (.5, .6), (.5, 0), (1, 0)]."""
    out: list[tuple[float, float]] = []
    for x, y in points:
        if out and y != out[-1][1]:
            out.append((out[-1][0], y))
        out.append((x, y))
    if end is not None and out:
        if out[-1][1] != 0:
            out.append((out[-1][0], 0.0))
        if end > out[-1][0]:
            out.append((end, 0.0))
    return out


def _points(xs: Any, ys: Any) -> list[tuple[float, float]]:
    """(x, y) pairs with both numbers, sorted by x (a record's curve is already; an edited one may not be)."""
    pairs = [(float(x), float(y)) for x, y in zip(xs or [], ys or []) if _is_number(x) and _is_number(y)]
    return sorted(pairs, key=lambda p: p[0])


def _axis_label(norm: Any) -> str:
    return f"certified radius ({norm})" if norm == "l2" else f"epsilon ({norm})"


def certified_svg(lines: Sequence[dict[str, Any]], *, norm: Any, title: str,
                  references: Sequence[dict[str, Any]] = ()) -> str:
    """Certified and empirical robust accuracy against the radius (or epsilon) as inline SVG, y in [0, 1].

    Each line is {"name", "kind": "certified" | "empirical", "points": [(radius, accuracy)], "step"?,
    "colour"?}: a certified line is solid, a step curve (`step`, randomized smoothing's: its last radius
    the largest certified, so it drops to 0 there) without markers and the joined level points (interval
    bounds') with them; an empirical line is dashed with a marker
    at each level. Example: certified_svg([{"name": "certified", "kind": "certified", "points":
    [(0.0, 0.9), (0.5, 0.55)], "step": True}], norm="l2", title="smoothing")."""
    items = []
    hi = max((float(x) for ln in lines for x, _ in ln.get("points") or []), default=0.0)
    for i, ln in enumerate(lines):
        certified = ln.get("kind") == "certified"
        pts = [(float(x), float(y)) for x, y in ln.get("points") or []]
        step = certified and bool(ln.get("step"))
        items.append({"name": str(ln["name"]), "points": step_points(pts, end=hi) if step else pts, "marks": not step,
                      "colour": ln.get("colour") or _PALETTE[i % len(_PALETTE)], "dash": "" if certified else _EMPIRICAL_DASH})
    return _plot_svg(title, items, _linear_axis(hi), _UNIT, x_label=_axis_label(norm), y_label="accuracy", references=references)


def _step(c: dict[str, Any]) -> bool:
    # smoothing's curve steps at every certified point's radius; interval bounds' curve is its levels
    return c.get("norm") == "l2" or "sigma" in (c.get("params") or {})


def _lines(c: dict[str, Any]) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(the certified curve, the empirical points at the levels) of one certificate record."""
    levels = [lv for lv in c.get("levels") or [] if isinstance(lv, dict)]
    curve = c.get("curve") or {}
    certified = _points(curve.get("radius"), curve.get("certified_accuracy"))
    if not certified:  # a record without a curve still has its levels
        certified = _points([lv.get("value") for lv in levels], [lv.get("certified_accuracy") for lv in levels])
    empirical = _points([lv.get("value") for lv in levels], [lv.get("empirical_robust_accuracy") for lv in levels])
    return certified, empirical


def _heading(c: dict[str, Any]) -> str:
    """"l2, sigma 0.25, n 10000, alpha 0.001" or "linf, method ibp"."""
    params = c.get("params") or {}
    parts = [str(c.get("norm") or "?")]
    if _step(c):
        parts += [f"{k} {params[k]}" for k in ("sigma", "n") if k in params]
        parts.append(f"alpha {c.get('alpha', params.get('alpha'))}")
    elif c.get("method") or params.get("method"):
        parts.append(f"method {c.get('method') or params.get('method')}")
    return ", ".join(parts)


def _certificate(c: dict[str, Any], intervals: dict[str, Any], index: int) -> dict[str, Any]:
    from markupsafe import Markup

    cid = str(c.get("id"))
    certified, empirical = _lines(c)
    step = _step(c)
    steps = (c.get("params") or {}).get("attack_steps")
    attack = ("L2 PGD with EOT on the smoothed classifier" if step else "PGD") + (f", {steps} steps" if steps is not None else "")
    lines = [{"name": "certified accuracy", "kind": "certified", "points": certified, "step": step},
             {"name": "empirical robust accuracy", "kind": "empirical", "points": empirical}]  # the attack: in the caption
    clean = c.get("clean_accuracy")
    refs = ([{"name": "clean accuracy (smoothed)" if step else "clean accuracy", "y": clean, "colour": "#8c959f", "dash": "3 3"}]
            if _is_number(clean) else [])
    chart = Markup(certified_svg(lines, norm=c.get("norm"), references=refs,
                                 title=f"{cid}: certified accuracy against {'the radius' if step else 'epsilon'}"))
    rows = []
    for lv in c.get("levels") or []:
        if not isinstance(lv, dict):
            continue
        m = metric_id("certified_accuracy", cid, str(lv.get("label")))
        violations, allowed = lv.get("n_violations"), lv.get("allowed_violations")
        rows.append({"label": lv.get("label"), "metric": m, "certified": lv.get("certified_accuracy"), "ci": _probe_ci(c, m, intervals),
                     "n_certified": lv.get("n_certified"), "empirical": lv.get("empirical_robust_accuracy"),
                     "n_empirical": lv.get("n_empirical_robust"), "violations": violations, "allowed": allowed,
                     "broken": _is_number(violations) and _is_number(allowed) and violations > allowed,
                     "above": (_is_number(lv.get("certified_accuracy")) and _is_number(lv.get("empirical_robust_accuracy"))
                               and lv["certified_accuracy"] > lv["empirical_robust_accuracy"])})
    params = c.get("params") or {}
    settings = [("points", c.get("n_points"))] + [(k, v) for k, v in params.items() if k != "method" or not c.get("method")]
    if c.get("method"):
        settings.insert(1, ("method", c["method"]))
    rates = [(f"clean accuracy ({'smoothed classifier' if step else 'the network'})", "clean_accuracy", c.get("clean_accuracy")),
             ("abstain rate (smoothed prediction)", "abstain_rate", c.get("abstain_rate"))]
    measures = [{"label": label, "value": v, "ci": _probe_ci(c, metric_id(fam, cid), intervals)} for label, fam, v in rates
                if v is not None]
    if c.get("certify_abstain_rate") is not None:
        measures.append({"label": "abstain rate (certification)", "value": c["certify_abstain_rate"], "ci": None})
    soundness = c.get("soundness") if isinstance(c.get("soundness"), dict) else {}
    status = soundness.get("status")
    return {"id": cid, "name": c.get("name"), "anchor": f"certificate-{index}", "heading": _heading(c), "step": step,
            "norm": c.get("norm") or "?", "chart": chart, "rows": rows, "measures": measures,
            "settings": [(k, v) for k, v in settings if v is not None], "n_points": c.get("n_points"), "attack": attack,
            "alpha": f"{c['alpha']:g}" if _is_number(c.get("alpha")) else "–", "seconds": c.get("seconds"),
            "soundness": {"status": status, "kind": status if status in ("pass", "fail", "warn", "skipped") else "",
                          "detail": soundness.get("detail")} if soundness else None}


def certificates_section(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The report's Certificates section (template context), or None for a record without certificates.
    Example: certificates_section(card)["certs"][0]["rows"][0]["certified"] == 0.8."""
    records = [c for c in record.get("certificates") or [] if isinstance(c, dict)]
    if not records:
        return None
    intervals = record.get("intervals") or {}
    return {"certs": [_certificate(c, intervals, i) for i, c in enumerate(records, 1)]}


def compare_certificates(records: Sequence[dict[str, Any]], labels: Sequence[str],
                         statuses: dict[str, list[Optional[str]]]) -> list[dict[str, Any]]:
    """Per certificate id that two or more versions carry: each version's certified curve and empirical
    points, and per level (in the order the versions first name them) each version's figures, with the
    status of its certified accuracy against the reference from `statuses` ({metric: per version}).
    Plain data: a comparison record is saved as JSON."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for r, label in zip(records, labels):
        for c in r.get("certificates") or []:
            if isinstance(c, dict):
                found.setdefault(str(c.get("id")), {}).setdefault(label, c)
    out = []
    for cid, by_label in found.items():
        if len(by_label) < 2:
            continue  # nothing to set it against; its metrics are listed as partial
        first = next(iter(by_label.values()))
        lines = {}
        order: list[str] = []
        values: dict[str, Any] = {}
        for label, c in by_label.items():
            certified, empirical = _lines(c)
            lines[label] = {"certified": [list(p) for p in certified], "empirical": [list(p) for p in empirical], "step": _step(c)}
            for lv in c.get("levels") or []:
                if isinstance(lv, dict) and str(lv.get("label")) not in order:
                    order.append(str(lv.get("label")))
                    values[str(lv.get("label"))] = lv.get("value")
        rows = []
        for level in order:
            m = metric_id("certified_accuracy", cid, level)
            cells = []
            for i, label in enumerate(labels):
                c = by_label.get(label)
                lv = next((x for x in (c or {}).get("levels") or [] if isinstance(x, dict) and str(x.get("label")) == level), None)
                if lv is None:
                    cells.append(None)
                    continue
                status = (statuses.get(m) or [None] * len(labels))[i]
                cells.append({"certified": lv.get("certified_accuracy"), "ci": _probe_ci(c, m, records[i].get("intervals") or {}),
                              "empirical": lv.get("empirical_robust_accuracy"), "violations": lv.get("n_violations"),
                              "allowed": lv.get("allowed_violations"), "status": status or "",
                              "broken": _is_number(lv.get("n_violations")) and _is_number(lv.get("allowed_violations"))
                              and lv["n_violations"] > lv["allowed_violations"]})
            rows.append({"label": level, "value": values[level], "metric": m, "cells": cells})
        out.append({"id": cid, "name": first.get("name"), "norm": first.get("norm"), "versions": list(by_label), "lines": lines,
                    "rows": rows})
    return out


def compare_svg(entry: dict[str, Any], colours: dict[str, str]) -> str:
    """One certificate id across versions: per version (its colour) the certified curve, solid, and the
    empirical points, dashed."""
    lines = []
    for label in entry["versions"]:
        ln = entry["lines"][label]
        lines += [{"name": f"{label}: certified", "kind": "certified", "points": [tuple(p) for p in ln["certified"]],
                   "step": ln["step"], "colour": colours.get(label)},
                  {"name": f"{label}: empirical", "kind": "empirical", "points": [tuple(p) for p in ln["empirical"]],
                   "colour": colours.get(label)}]
    return certified_svg(lines, norm=entry["norm"], title=f"{entry['id']}: certified and empirical robust accuracy per version")
