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
    out = [f"gate {g['metric']} {g['op']} {g['threshold']}: {g.get('reason') or g['verdict']}" for g in record["gates"] if g["verdict"] != "pass"]
    out += [f"check {c['name']}: {c['detail']}" for c in record["checks"] if c["status"] == "fail"]
    return out


def report_html(record: dict[str, Any]) -> str:
    return _env().get_template("report.html.j2").render(card=record, why=_why(record), compact=False)


def compact_html(record: dict[str, Any]) -> str:
    return _env().get_template("report.html.j2").render(card=record, why=_why(record), compact=True)


def junit_xml(record: dict[str, Any]) -> str:
    """One testcase per gate (a failure element for a failed or inconclusive gate); failed checks in a second suite."""
    root = ET.Element("testsuites", name=f"harness {record['name']}")
    gates = record["gates"]
    suite = ET.SubElement(root, "testsuite", name=f"gates.{record['name']}", tests=str(len(gates)),
                          failures=str(sum(g["verdict"] != "pass" for g in gates)), errors="0", skipped="0",
                          time=str(record["provenance"].get("duration_s", 0.0)))
    for g in gates:
        case = ET.SubElement(suite, "testcase", classname=f"harness.{record['name']}.gates",
                             name=f"{g['metric']} {g['op']} {g['threshold']}")
        if g["verdict"] != "pass":
            msg = f"{g['verdict']}: value {_num(g['value'])}; {g.get('reason', '')}".strip()
            fail = ET.SubElement(case, "failure", message=msg, type=g["verdict"])
            fail.text = msg
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
        lines.append(f"| {_md(g['metric'])} | {_num(g['value'])} | {ci} | {_md(g['op'])} {g['threshold']} | {_num(g['baseline'])} | {g['verdict']} |")
    if record["attacks"]:
        lines += ["", "| attack | norm | epsilon | robust accuracy | success rate | seconds |", "| --- | --- | --- | ---: | ---: | ---: |"]
        for a in record["attacks"]:
            lines.append(f"| {_md(a['id'])} | {a['norm']} | {_md(a['epsilon'])} | {_num(a['robust_accuracy'])} | {_num(a['attack_success_rate'])} | {_num(a['seconds'], 2)} |")
    lines += ["", f"clean accuracy {_num(record['metrics'].get('clean_accuracy'))} on {record['provenance'].get('samples', '?')} samples; "
              f"device {_md(record['provenance'].get('device', '?'))}; seed {record['provenance'].get('seed')}"]
    return "\n".join(lines) + "\n"
