"""Renderings of a scorecard record: report.html, junit.xml, summary.md. Pure functions.

Everything a user controls (names, paths, labels) is escaped: HTML through Jinja's autoescape,
XML through ElementTree, Markdown by escaping its table syntax.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

__all__ = ["report_html", "compact_html", "junit_xml", "summary_md"]

_TEMPLATES = Path(__file__).with_name("templates")


def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    return env


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _why(record: dict[str, Any]) -> list[str]:
    """The reasons for a verdict that is not a pass, one line each."""
    out = [f"gate {g['metric']} {g['op']} {g['threshold']}: {g.get('reason') or g['verdict']}"
           + (" (passed by on_inconclusive: pass)" if g["verdict"] == "inconclusive" and g.get("passed") else "")
           for g in record["gates"] if g["verdict"] != "pass"]
    out += [f"check {c['name']}: {c['detail']}" for c in record["checks"] if c["status"] == "fail"]
    return out


_PALETTE = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#1b7c83", "#d1242f", "#57606a")


def curve_svg(norm: str, lines: dict[str, list[tuple[float, float]]]) -> str:
    """A robust-accuracy-vs-epsilon chart as inline SVG (no script, no fetch); labels escaped."""
    from markupsafe import escape

    w, h, left, bottom, top, right = 460, 260, 46, 34, 12, 150
    xmax = max((x for pts in lines.values() for x, _ in pts), default=1.0) or 1.0
    sx = lambda x: left + (w - left - right) * x / xmax
    sy = lambda y: top + (h - top - bottom) * (1 - y)
    parts = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-label="robust accuracy against {escape(norm)} epsilon" style="max-width:100%;height:auto">']
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#d0d7de"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" font-size="11" text-anchor="end">{t:g}</text>')
    for t in (0.0, xmax / 2, xmax):
        parts.append(f'<text x="{sx(t):.1f}" y="{h - bottom + 16}" font-size="11" text-anchor="middle">{t:.3g}</text>')
    parts.append(f'<text x="{(left + w - right) / 2:.1f}" y="{h - 4}" font-size="12" text-anchor="middle">{escape(norm)} epsilon</text>')
    for i, (name, pts) in enumerate(sorted(lines.items(), key=lambda kv: kv[0] == "worst")):
        colour = "#1f2328" if name == "worst" else _PALETTE[i % len(_PALETTE)]
        dash = ' stroke-dasharray="5 3"' if name == "worst" else ""
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        parts.append(f'<text x="{w - right + 8}" y="{top + 14 + 16 * i}" font-size="12" fill="{colour}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _charts(record: dict[str, Any]) -> list[tuple[str, str]]:
    from markupsafe import Markup

    from .metrics import curves

    return [(norm, Markup(curve_svg(norm, lines))) for norm, lines in sorted(curves(record).items())]


def report_html(record: dict[str, Any]) -> str:
    return _env().get_template("report.html.j2").render(card=record, why=_why(record), compact=False, charts=_charts(record))


def compact_html(record: dict[str, Any]) -> str:
    return _env().get_template("report.html.j2").render(card=record, why=_why(record), compact=True, charts=_charts(record))


def junit_xml(record: dict[str, Any]) -> str:
    """One testcase per gate (a failure element for a gate that did not pass: failed, or inconclusive
    under on_inconclusive: fail); failed checks in a second suite."""
    root = ET.Element("testsuites", name=f"harness {record['name']}")
    gates = record["gates"]
    suite = ET.SubElement(root, "testsuite", name=f"gates.{record['name']}", tests=str(len(gates)),
                          failures=str(sum(not g["passed"] for g in gates)), errors="0", skipped="0",
                          time=str(record["provenance"].get("duration_s", 0.0)))
    for g in gates:
        case = ET.SubElement(suite, "testcase", classname=f"harness.{record['name']}.gates",
                             name=f"{g['metric']} {g['op']} {g['threshold']}")
        msg = f"{g['verdict']}: value {_num(g['value'])}; {g.get('reason', '')}".strip()
        if not g["passed"]:
            ET.SubElement(case, "failure", message=msg, type=g["verdict"]).text = msg
        elif g["verdict"] != "pass":
            ET.SubElement(case, "system-out").text = f"passed by on_inconclusive: pass; {msg}"
    checks = record["checks"]
    csuite = ET.SubElement(root, "testsuite", name=f"checks.{record['name']}", tests=str(len(checks)),
                           failures=str(sum(c["status"] == "fail" for c in checks)), errors="0", skipped="0")
    for c in checks:
        case = ET.SubElement(csuite, "testcase", classname=f"harness.{record['name']}.checks", name=c["name"])
        if c["status"] == "fail":
            ET.SubElement(case, "failure", message=c["detail"], type="check").text = c["detail"]
        elif c["status"] == "warn":
            ET.SubElement(case, "system-out").text = f"warning: {c['detail']}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _md(text: Any) -> str:
    s = str(text)
    for ch in "\\|*_`<>[]":
        s = s.replace(ch, "\\" + ch)
    return s.replace("\n", " ")


def summary_md(record: dict[str, Any]) -> str:
    icon = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️"}[record["verdict"]]
    lines = [f"### {icon} harness: {_md(record['name'])}: {record['verdict']}", ""]
    lines += [f"- {_md(w)}" for w in _why(record)]
    if _why(record):
        lines.append("")
    lines += ["| gate | value | 95% CI | threshold | baseline | verdict |", "| --- | ---: | --- | --- | ---: | --- |"]
    for g in record["gates"]:
        ci = "–" if not g.get("ci95") else f"[{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]"
        if g.get("drop_ci95"):
            ci += f"; drop [{g['drop_ci95'][0]:.3f}, {g['drop_ci95'][1]:.3f}]"
        verdict = g["verdict"] + (" (allowed)" if g["verdict"] == "inconclusive" and g.get("passed") else "")
        lines.append(f"| {_md(g['metric'])} | {_num(g['value'])} | {ci} | {_md(g['op'])} {g['threshold']} | {_num(g['baseline'])} | {verdict} |")
    if record["attacks"]:
        lines += ["", "| attack | norm | epsilon | robust accuracy | success rate | seconds |", "| --- | --- | --- | ---: | ---: | ---: |"]
        for a in record["attacks"]:
            lines.append(f"| {_md(a['id'])} | {a['norm']} | {_md(a['epsilon'])} | {_num(a['robust_accuracy'])} | {_num(a['attack_success_rate'])} | {_num(a['seconds'], 2)} |")
    lines += ["", f"clean accuracy {_num(record['metrics'].get('clean_accuracy'))} on {record['provenance'].get('samples', '?')} samples; "
              f"device {_md(record['provenance'].get('device', '?'))}; seed {record['provenance'].get('seed')}"]
    return "\n".join(lines) + "\n"
