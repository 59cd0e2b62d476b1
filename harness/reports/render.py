"""Renderings of a scorecard record: report.html, the notebook view, junit.xml, summary.md. Pure functions.

Everything a user controls (names, paths, labels) is escaped: HTML through Jinja's autoescape and
markupsafe in the hand-built SVG, XML through ElementTree (with the characters XML 1.0 forbids
dropped), Markdown by escaping its inline and table syntax. Records from older versions may lack
any key added since schema 1 (classes, examples, intervals, ...): the sections they feed are left out.
The CSS lives in one partial, templates/_style.css.j2 (`style_css()`), shared with `harness compare`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

__all__ = ["report_html", "compact_html", "junit_xml", "summary_md", "curve_svg",
           "style_css"]

_TEMPLATES = Path(__file__).with_name("templates")
_VERDICTS = ("pass", "fail", "inconclusive")
MAX_CLASS_ROWS = 30  # beyond this many classes the heatmap shows the most vulnerable ones only
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@functools.lru_cache(maxsize=1)
def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, signed=_signed, ci=_ci_text, gate_ci=_gate_ci)
    return env


def style_css() -> str:
    """The report's stylesheet (every rule scoped to `.hr-card`), for a page that embeds report parts."""
    return _env().get_template("_style.css.j2").render()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_INF_TEXT = {"inf": "∞", "-inf": "−∞"}  # scorecard.json spells infinities "inf"; either form shows as ∞


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return _INF_TEXT.get(v, str(v)) if isinstance(v, str) else str(v)


def _signed(v: Any, digits: int = 4) -> str:
    return f"{v:+.{digits}f}".replace("-", "−") if _is_number(v) else "–"


def _ci_text(ci: Any, digits: int = 3) -> str:
    ends = list(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 else []
    ends = [{"inf": math.inf, "-inf": -math.inf}.get(c, c) if isinstance(c, str) else c for c in ends]
    if ends and all(isinstance(c, (int, float)) and not isinstance(c, bool) and not math.isnan(c) for c in ends):
        return f"[{_num(float(ends[0]), digits)}, {_num(float(ends[1]), digits)}]"
    return "–"


def _gate_ci(g: dict[str, Any]) -> str:
    """A gate's 95% CI cell: its interval, or "point value" for a metric judged without one."""
    if g.get("interval_method") == "point" and g.get("op") != "max_drop":
        return "point value"
    return _ci_text(g.get("ci95"))


def _why(record: dict[str, Any]) -> list[str]:
    """The reasons for a verdict that is not a pass, one line each: the gates that did not pass
    (failed, or inconclusive whatever the policy made of them) and the checks that failed."""
    out = []
    for g in record.get("gates", []):
        if g.get("verdict") == "pass":
            continue
        reason = g.get("reason") or g.get("verdict")
        if g.get("verdict") == "inconclusive" and g.get("passed") and "on_inconclusive" not in str(reason):
            reason = f"{reason} (passed by on_inconclusive: pass)"
        out.append(f"gate {g.get('metric')} {g.get('op')} {g.get('threshold')}: {reason}")
    out += [f"check {c.get('name')}: {c.get('detail')}" for c in record.get("checks", []) if c.get("status") == "fail"]
    return out


def _tally(record: dict[str, Any]) -> str:
    """One line under the verdict: how many gates passed and how the checks came out."""
    gates, checks = record.get("gates", []), record.get("checks", [])
    status = [c.get("status") for c in checks]
    parts = [f"{sum(bool(g.get('passed')) for g in gates)} of {len(gates)} gate(s) passed"]
    if checks:
        parts.append(f"{len(checks)} check(s): " + ", ".join(f"{status.count(s)} {s}" for s in ("pass", "warn", "fail", "skipped")))
    return "; ".join(parts)


# --- charts -----------------------------------------------------------------------------------

_PALETTE = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#1b7c83", "#d1242f", "#57606a")
_FONT = "system-ui, -apple-system, 'Segoe UI', sans-serif"
_LEGEND_CHARS = 32


def _nice_step(span: float, ticks: int = 4) -> float:
    raw = span / ticks
    scale = 10 ** math.floor(math.log10(raw))
    return next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= raw * (1 - 1e-9))


def legend_entry(i: int, top: float, right: float, colour: str, dash: str, name: str, shown: str) -> str:
    """The i-th legend row beside a chart whose plot ends at x = `right`: a line in the series' style
    and its (shortened) name, the full name as its tooltip; both escaped."""
    from markupsafe import escape

    ly = top + 10 + 18 * i
    return (f'<g class="legend"><line x1="{right + 14}" x2="{right + 38}" y1="{ly}" y2="{ly}" stroke="{colour}" '
            f'stroke-width="2"{dash}/><text x="{right + 44}" y="{ly + 4}" font-size="12" fill="#1f2328">'
            f'<title>{escape(name)}</title>{escape(shown)}</text></g>')


def curve_svg(norm: str, lines: dict[str, list[tuple[float, float]]], *, title: Optional[str] = None,
              x_label: Optional[str] = None, y_label: str = "robust accuracy") -> str:
    """Robust accuracy against epsilon as inline SVG (no script, no fetch, labels escaped): one line
    per entry of `lines` (name -> [(epsilon, accuracy)]), "worst" drawn dashed in black, with a
    title, axis titles, tick labels and a legend."""
    from markupsafe import escape

    lines = {str(k): [(float(x), float(y)) for x, y in pts if _is_number(x) and _is_number(y)] for k, pts in lines.items()}
    names = sorted(lines, key=lambda k: (k == "worst", k))
    shown = {k: "worst case" if k == "worst" else (k if len(k) <= _LEGEND_CHARS else k[:_LEGEND_CHARS - 1] + "…") for k in names}
    left, top, bottom, plot_w = 58, 34, 50, 380
    right = round(min(300, max(110, 52 + 7.2 * max((len(s) for s in shown.values()), default=0))))  # legend: sample + text
    w, h = left + plot_w + right, max(300, top + 40 + 18 * len(names))
    plot_h = h - top - bottom
    xmax = max((x for pts in lines.values() for x, _ in pts), default=0.0)
    step = _nice_step(xmax) if xmax > 0 else 0.25
    xend = step * math.ceil(xmax / step - 1e-9) if xmax > 0 else 1.0
    sx = lambda x: left + plot_w * x / xend
    sy = lambda y: top + plot_h * (1 - y)
    title = title or f"Robust accuracy against {norm} epsilon"
    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{escape(title)}" '
             f'font-family="{_FONT}" style="max-width:100%;height:auto">',
             f"<title>{escape(title)}</title>",
             f'<text x="{left}" y="18" font-size="14" font-weight="600" fill="#1f2328">{escape(title)}</text>']
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#d0d7de"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" font-size="11" text-anchor="end" fill="#1f2328">{t:.1f}</text>')
    for i in range(int(round(xend / step)) + 1):
        t = i * step
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#57606a"/>'
                     f'<text x="{sx(t):.1f}" y="{top + plot_h + 17}" font-size="11" text-anchor="middle" fill="#1f2328">{float(f"{t:.6g}"):g}</text>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#57606a"/>'
                 f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#57606a"/>'
                 f'<text x="{left + plot_w / 2:.1f}" y="{h - 10}" font-size="12" text-anchor="middle" fill="#1f2328">{escape(x_label or f"epsilon ({norm})")}</text>'
                 f'<text transform="translate(16 {top + plot_h / 2:.1f}) rotate(-90)" font-size="12" text-anchor="middle" fill="#1f2328">{escape(y_label)}</text>')
    if not any(lines.values()):
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" font-size="12" text-anchor="middle" fill="#57606a">no points</text>')
    for i, name in enumerate(names):
        worst = name == "worst"
        colour = "#1f2328" if worst else _PALETTE[i % len(_PALETTE)]
        dash = ' stroke-dasharray="6 4"' if worst else ""
        pts = lines[name]
        if len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for x, y in pts:
            tip = f"<title>{escape(shown[name])} at {x:g}: {y:.4f}</title>"
            parts.append(f'<rect x="{sx(x) - 3.5:.1f}" y="{sy(y) - 3.5:.1f}" width="7" height="7" fill="{colour}">{tip}</rect>' if worst
                         else f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{colour}">{tip}</circle>')
        parts.append(legend_entry(i, top, left + plot_w, colour, dash, name, shown[name]))
    parts.append("</svg>")
    return "".join(parts)


def _charts(record: dict[str, Any]) -> list[tuple[str, Any]]:
    from markupsafe import Markup

    from harness.core.curves import curves

    return [(norm, Markup(curve_svg(norm, lines))) for norm, lines in sorted(curves(record).items())]


# --- sections built from the record -----------------------------------------------------------

def _gates(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Gate records with their delta against the baseline (value - baseline) filled in."""
    out = []
    for g in record.get("gates", []):
        delta = g.get("delta")
        if delta is None and _is_number(g.get("value")) and _is_number(g.get("baseline")):
            delta = g["value"] - g["baseline"]
        out.append({**g, "delta": delta, "verdict": g.get("verdict", "?"), "kind": _kind(g.get("verdict"))})
    return out


def _kind(verdict: Any) -> str:
    return verdict if verdict in _VERDICTS else "unknown"


def _worst_parts(key: str) -> tuple[str, str]:
    """"robust_accuracy:worst-linf@8/255" -> ("linf", "8/255")."""
    norm, _, label = key.removeprefix("robust_accuracy:worst-").partition("@")
    return norm, label


def _main_worst(record: dict[str, Any], keys: list[str]) -> Optional[str]:
    """The worst-case metric the suite is about: the first one a gate names, else the middle
    epsilon of the first norm."""
    for g in record.get("gates", []):
        if g.get("metric") in keys:
            return g["metric"]
    if not keys:
        return None
    values = {(a.get("norm"), a.get("epsilon")): a.get("epsilon_value") for a in record.get("attacks", [])}
    norm = _worst_parts(keys[0])[0]
    same = [k for k in keys if _worst_parts(k)[0] == norm]
    same.sort(key=lambda k: v if _is_number(v := values.get(_worst_parts(k))) else 0.0)
    return same[(len(same) - 1) // 2]


def _heat(v: Any) -> str:
    """A light background from red (0) through yellow to green (1), dark text stays readable."""
    return f"background:hsl({120 * min(1.0, max(0.0, v)):.0f},70%,86%)" if _is_number(v) else "background:#f6f8fa"


def _classes(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    cls = record.get("classes")
    if not isinstance(cls, dict) or not cls.get("ids"):
        return None
    ids = list(cls["ids"])
    fit = lambda v, default: v if isinstance(v, list) and len(v) == len(ids) else default
    names = fit(cls.get("names"), [str(i) for i in ids])
    count, clean = fit(cls.get("n"), [None] * len(ids)), fit(cls.get("clean_accuracy"), [None] * len(ids))
    robust = {k: v for k, v in (cls.get("robust_accuracy") or {}).items() if fit(v, None) is not None}
    columns = [k.removeprefix("robust_accuracy:") for k in robust]
    main = _main_worst(record, list(robust))
    order = list(range(len(ids)))
    if main is not None:
        ranked = sorted((i for i in order if _is_number(robust[main][i])), key=lambda i: (robust[main][i], i))
    else:
        ranked = sorted((i for i in order if _is_number(clean[i])), key=lambda i: (clean[i], i))
    rows = order if len(ids) <= MAX_CLASS_ROWS else sorted(ranked[:MAX_CLASS_ROWS])
    cells = lambda i: [{"value": v, "style": _heat(v)} for v in [clean[i]] + [robust[k][i] for k in robust]]
    vulnerable = [{"name": names[i], "value": (robust[main] if main else clean)[i], "n": count[i]} for i in ranked[:3]]
    return {"columns": columns, "rows": [{"name": names[i], "n": count[i], "cells": cells(i)} for i in rows],
            "vulnerable": vulnerable, "main": (main or "clean_accuracy").removeprefix("robust_accuracy:"),
            "total": len(ids), "truncated": len(rows) < len(ids)}


def _png(b64: Any) -> Optional[tuple[str, int, int]]:
    """A base64 PNG re-encoded canonically with its width and height, or None if it is not one."""
    if not isinstance(b64, str):
        return None
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) < 24 or not raw.startswith(PNG_SIGNATURE) or raw[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", raw[16:24])
    return (base64.b64encode(raw).decode("ascii"), w, h) if w and h else None


def _examples(record: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for e in record.get("examples") or []:
        images = {k: _png(e.get(k)) for k in ("original", "perturbation", "adversarial")}
        if not all(images.values()):
            continue
        _, w, h = images["original"]
        scale = max(1, math.ceil(96 / w)) if w < 96 else 1
        width = min(224, w * scale)
        out.append({**{k: e.get(k) for k in ("attack", "norm", "epsilon", "sample", "label", "prediction", "distance", "amplification")},
                    "images": {k: v[0] for k, v in images.items()}, "width": width, "height": round(h * width / w)})
    return out


def _cell(v: Any) -> str:
    return v if isinstance(v, str) else _num(v) if v is None or isinstance(v, (bool, int, float)) else json.dumps(v, default=str)


def _table(records: Any) -> Optional[dict[str, Any]]:
    """Records of any shape as one table: the union of their keys as columns, nested values as JSON."""
    rows = [r for r in records or [] if isinstance(r, dict)]
    if not rows:
        return None
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return {"columns": columns, "rows": [[_cell(r.get(k)) for k in columns] for r in rows]}


def _probes(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Poisoning: per probe, attack success and clean accuracy against the poisoning fraction (a chart
    and a table with the trigger pictured and the scans of what it planted); scans on their own."""
    from markupsafe import Markup

    from harness.reports.images import encode_probe_images

    # a record saved before its pictures were encoded (a partial save) still shows them
    records = [p for p in encode_probe_images(record.get("probes") or []) if isinstance(p, dict)]
    if not records:
        return None
    if any("kind" not in p for p in records):
        return {"generic": _table(records)}
    intervals = record.get("intervals") or {}
    by_probe: dict[str, list[dict[str, Any]]] = {}
    for p in records:
        if p["kind"] == "probe":
            by_probe.setdefault(p["id"], []).append(p)
    probes = []
    for pid, rows in by_probe.items():
        rows = sorted(rows, key=lambda r: r.get("fraction_value") or 0.0)
        lines = {"clean accuracy": [(r["fraction_value"], r["clean_accuracy"]) for r in rows if r.get("clean_accuracy") is not None]}
        asr = [(r["fraction_value"], r["attack_success_rate"]) for r in rows if r.get("attack_success_rate") is not None]
        if asr:
            lines["attack success"] = asr
        chart = Markup(curve_svg("fraction", lines, title=f"{pid}: against the poisoning fraction", x_label="poisoned fraction of the training set",
                                 y_label="rate"))
        table = [{**r, "asr_ci": intervals.get(f"attack_success_rate:{pid}@{r['fraction']}"),
                  "trigger_ok": _png_ok(r.get("trigger"))} for r in rows]
        probes.append({"id": pid, "name": rows[0]["name"], "chart": chart, "rows": table})
    scans = [p for p in records if p["kind"] in ("model-scan", "data-scan")]
    for p in scans:
        p["images_ok"] = _png_ok(p.get("mask")) and _png_ok(p.get("pattern"))
    return {"probes": probes, "scans": scans} if probes or scans else None  # privacy records have their own section


def _png_ok(b64: Any) -> bool:
    import base64
    import binascii

    if not isinstance(b64, str):
        return False
    try:
        return base64.b64decode(b64, validate=True)[:8] == b"\x89PNG\r\n\x1a\n"
    except (binascii.Error, ValueError):
        return False


def _privacy_section(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    from harness.reports.privacy import privacy_section  # it draws with this module's helpers

    return privacy_section(record)


def _certificates_section(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    from harness.reports.certificates import certificates_section  # it draws with privacy's chart helpers

    return certificates_section(record)


def _defenses(record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The undefended model and each defended variant side by side (clean accuracy and every robust
    accuracy, with the change against the undefended model), and the detectors' figures."""
    records = [d for d in record.get("defenses") or [] if isinstance(d, dict)]
    if not records:
        return None
    if any("kind" not in d for d in records):  # not this harness's shape: show it as it is
        return {"generic": _table(records)}
    metrics = record.get("metrics") or {}
    variants = [d for d in records if d.get("kind") != "detector"]
    columns = [f"{d['id']}" + (f" ({d['mode']})" if d.get("mode") else "") for d in variants]
    keys = ["clean_accuracy"] + sorted(m for m in metrics if m.startswith("robust_accuracy:") and "/" not in m.split(":", 1)[1])
    rows = []
    for key in keys:
        base = metrics.get(key)
        cells = []
        for d in variants:
            value = d.get("clean_accuracy") if key == "clean_accuracy" else (d.get("robust_accuracy") or {}).get(key)
            delta = None if value is None or base is None else value - base
            cells.append({"value": _num(value), "delta": None if delta is None else f"{delta:+.4f}",
                          "kind": "" if delta is None or abs(delta) < 1e-12 else ("good" if delta > 0 else "bad")})
        rows.append({"metric": key, "base": _num(base), "cells": cells})
    detectors = [{"id": d["id"], **r} for d in records if d.get("kind") == "detector" for r in d.get("results") or []]
    return {"columns": columns, "rows": rows, "detectors": detectors,
            "naive": [d["id"] for d in variants if d.get("mode") == "naive"]}


def _provenance(record: dict[str, Any]) -> dict[str, Any]:
    prov = record.get("provenance") or {}
    nested = ("versions", "artifacts", "outputs")
    fields = [(k, _cell(v)) for k, v in prov.items() if k not in nested]
    outputs = prov.get("outputs") if isinstance(prov.get("outputs"), dict) else {}
    versions = prov.get("versions") if isinstance(prov.get("versions"), dict) else {}
    return {"fields": fields, "artifacts": _table(prov.get("artifacts")), "outputs": [(k, _cell(v)) for k, v in outputs.items()],
            "versions": [(k, _cell(v)) for k, v in versions.items()]}


def _context(record: dict[str, Any]) -> dict[str, Any]:
    return {"card": record, "vclass": _kind(record.get("verdict")), "why": _why(record), "tally": _tally(record),
            "gates": _gates(record), "charts": _charts(record), "intervals": record.get("intervals") or {}}


def report_html(record: dict[str, Any]) -> str:
    """report.html: one self-contained page (inline CSS, SVG and PNG; a CSP that forbids any load)."""
    from harness.records.scorecard import decode_infinities

    record = decode_infinities(record)  # a record as saved spells inf "inf"; the sections compute with floats
    ctx = _context(record)
    ctx.update(classes=_classes(record), examples=_examples(record), probes=_probes(record),
               privacy=_privacy_section(record), certificates=_certificates_section(record), defenses=_defenses(record), provenance=_provenance(record),
               stages=[a for a in record.get("attacks", []) if a.get("stages")])
    return _env().get_template("report.html.j2").render(**ctx)


def compact_html(record: dict[str, Any]) -> str:
    """The notebook view: verdict, gates and curves in one <div> whose CSS restyles nothing outside it."""
    from harness.records.scorecard import decode_infinities

    return _env().get_template("compact.html.j2").render(**_context(decode_infinities(record)))


# --- junit.xml and summary.md -------------------------------------------------------------------

_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _x(text: Any) -> str:
    """Text XML 1.0 can hold: the control characters it forbids are dropped."""
    return _XML_BAD.sub("", str(text))


def junit_xml(record: dict[str, Any]) -> str:
    """One testcase per gate (a failure element for a gate that did not pass: failed, or inconclusive
    under on_inconclusive: fail); the checks in a second suite: a failed one as a failure, a skipped one
    (nothing to examine) as skipped, a warning as system-out."""
    name = _x(record["name"])
    gates, checks = record["gates"], record["checks"]
    gate_failures = sum(not g["passed"] for g in gates)
    check_failures = sum(c["status"] == "fail" for c in checks)
    check_skips = sum(c["status"] == "skipped" for c in checks)
    root = ET.Element("testsuites", name=f"harness {name}", tests=str(len(gates) + len(checks)),
                      failures=str(gate_failures + check_failures), errors="0", skipped=str(check_skips))
    suite = ET.SubElement(root, "testsuite", name=f"gates.{name}", tests=str(len(gates)), failures=str(gate_failures),
                          errors="0", skipped="0", time=str(record["provenance"].get("duration_s") or 0.0))
    for g in gates:
        case = ET.SubElement(suite, "testcase", classname=f"harness.{name}.gates", name=_x(f"{g['metric']} {g['op']} {g['threshold']}"))
        msg = _x(f"{g['verdict']}: value {_num(g['value'])}; {g.get('reason', '')}".strip().rstrip(";"))
        if not g["passed"]:
            ET.SubElement(case, "failure", message=msg, type=_x(g["verdict"])).text = msg
        elif g["verdict"] != "pass":
            ET.SubElement(case, "system-out").text = f"passed by on_inconclusive: pass; {msg}"
    csuite = ET.SubElement(root, "testsuite", name=f"checks.{name}", tests=str(len(checks)), failures=str(check_failures),
                           errors="0", skipped=str(check_skips), time="0")
    for c in checks:
        case = ET.SubElement(csuite, "testcase", classname=f"harness.{name}.checks", name=_x(c["name"]))
        if c["status"] == "fail":
            ET.SubElement(case, "failure", message=_x(c["detail"]), type="check").text = _x(c["detail"])
        elif c["status"] == "skipped":
            ET.SubElement(case, "skipped", message=_x(c["detail"])).text = _x(c["detail"])
        elif c["status"] == "warn":
            ET.SubElement(case, "system-out").text = _x(f"warning: {c['detail']}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _md(text: Any) -> str:
    """Inline Markdown text: its syntax characters backslash-escaped (a `|` would split a table
    cell), line breaks folded into spaces."""
    s = str(text)
    for ch in "\\|*_`<>[]&~":
        s = s.replace(ch, "\\" + ch)
    return " ".join(s.split())


def _md_table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured table; `align` is one letter per column (l or r); every row padded to the header."""
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    out += ["| " + " | ".join((r + [""] * len(header))[:len(header)]) + " |" for r in rows]
    return out


def summary_md(record: dict[str, Any]) -> str:
    icon = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️"}.get(record["verdict"], "❔")
    lines = [f"### {icon} harness: {_md(record['name'])}: {_md(record['verdict'])}", ""]
    why = _why(record)
    lines += [f"- {_md(w)}" for w in why] + ([""] if why else [])
    rows = []
    for g in record["gates"]:
        ci = _gate_ci(g)
        if g.get("drop_ci95"):
            ci += f"; drop {_ci_text(g['drop_ci95'])}"
        elif g.get("op") == "max_drop" and g.get("interval_method") == "point":
            ci += "; drop: point value"
        if g.get("pairing"):
            ci += f"; {g['pairing'].partition(':')[0]}"
        verdict = g["verdict"] + (" (allowed)" if g["verdict"] == "inconclusive" and g.get("passed") else "")
        rows.append([_md(g["metric"]), _num(g["value"]), ci, f"{_md(g['op'])} {_md(g['threshold'])}", _num(g.get("baseline")), _md(verdict)])
    lines += _md_table(["gate", "value", "95% CI", "threshold", "baseline", "verdict"], "lrllrl", rows)
    warned = [g for g in record["gates"] if g.get("warning")]
    if warned:
        lines += [""] + [f"- ⚠️ {_md(g['metric'])}: {_md(g['warning'])}" for g in warned]
    if record["attacks"]:
        rows = [[_md(a["id"]), _md(a.get("norm") or "–"), _md(a["epsilon"]), _num(a["robust_accuracy"]),
                 _num(a["attack_success_rate"]), _num(a["seconds"], 2)] for a in record["attacks"]]
        lines += [""] + _md_table(["attack", "norm", "epsilon", "robust accuracy", "success rate", "seconds"], "lllrrr", rows)
    prov = record["provenance"]
    lines += ["", f"clean accuracy {_num(record['metrics'].get('clean_accuracy'))} on {_md(prov.get('samples', '?'))} samples; "
              f"device {_md(prov.get('device', '?'))}; seed {_md(prov.get('seed'))}; {_md(_tally(record))}"]
    skipped = [c for c in record["checks"] if c.get("status") == "skipped"]
    if skipped:  # a check that examined nothing vouches for nothing: say which, and why
        lines += ["", "skipped checks (nothing to examine):"] + [f"- {_md(c.get('name'))}: {_md(c.get('detail'))}" for c in skipped]
    return "\n".join(lines) + "\n"
