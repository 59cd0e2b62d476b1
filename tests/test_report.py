"""report.html, the notebook view, junit.xml and summary.md, rendered from a real small run's record
and from hand-made records (old ones without the newer keys, hostile ones)."""

from __future__ import annotations

import base64
import copy
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from harness.reports import render

HOSTILE = '<script>alert(1)</script> "q" & x'
ATTR_BREAK = 'x|y" onmouseover="alert(2)'


@pytest.fixture(scope="module")
def record() -> dict:
    import harness

    cfg = {
        "name": "report-test",
        "data": {"limit": 100},
        "attacks": [
            {"name": "fgsm", "norm": "linf", "epsilons": [0.05, 0.1]},
            {"name": "pgd", "norm": "linf", "epsilons": [0.05, 0.1], "steps": 5},
            {"name": "standard", "norm": "l2", "epsilons": [0.5], "steps": 2, "queries": 30, "n_target_classes": 2},
        ],
        "gates": [{"metric": "clean_accuracy", "min": 0.9},
                  {"metric": "robust_accuracy:worst-linf@0.1", "min": 0.99},
                  {"metric": "robust_accuracy:worst-linf@0.05", "max_drop": 0.02}],
    }
    return harness.run(cfg, show_progress=False).to_dict()


class Page(HTMLParser):
    """Every start tag with its attributes, the text, and the text of each element id'd section."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag]

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if "id" in a}

    @property
    def alltext(self) -> str:
        return "".join(self.text)


def audit(html: str) -> Page:
    """What makes a page safe to open: no script, no event handler, nothing that loads from anywhere
    but a data: PNG inside the page, every image a PNG that decodes."""
    page = Page(html)
    assert not page.find("script") and not page.find("iframe") and not page.find("object") and not page.find("link")
    for tag, attrs in page.tags:
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)
        assert "href" not in attrs or attrs["href"].startswith("#"), attrs
        assert "xlink:href" not in attrs
        if "src" in attrs:
            assert tag == "img" and attrs["src"].startswith("data:image/png;base64,"), attrs
    for img in page.find("img"):
        raw = base64.b64decode(img["src"].removeprefix("data:image/png;base64,"), validate=True)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n") and raw[12:16] == b"IHDR"
    lowered = html.lower()
    assert "http://" not in lowered and "https://" not in lowered and "url(" not in lowered and "@import" not in lowered
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", lowered)
    return page


def test_report_of_a_real_run_has_every_section(record):
    html = render.report_html(record)
    page = audit(html)
    assert {"gates", "curves", "attacks", "stages", "classes", "examples", "metrics", "checks", "provenance"} <= page.ids()
    (csp,) = [m["content"] for m in page.find("meta") if m.get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in csp and "img-src data:" in csp and "style-src 'unsafe-inline'" in csp
    text = page.alltext
    assert "FAIL" in text  # worst-linf@0.1 >= 0.99 cannot pass on this model
    assert "gate robust_accuracy:worst-linf@0.1 >= 0.99" in text and "max_drop needs a baseline" in text
    for g in record["gates"]:
        if g["ci95"]:
            assert f"[{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]" in text
    for a in record["attacks"]:
        assert f"{a['robust_accuracy']:.4f}" in text and f"{a['attack_success_rate']:.4f}" in text
    (std,) = [a for a in record["attacks"] if a.get("stages")]
    assert [s["attack"] for s in std["stages"]] == ["apgd-ce", "apgd-t", "square"]
    for s in std["stages"]:
        assert f"<td>{s['attack']}</td><td class=\"n\">{s['n_attacked']}</td><td class=\"n\">{s['n_broken']}</td>" in html
    assert len(page.find("svg")) == 2  # one chart per norm: linf and l2
    # every example: three decodable PNGs and its caption
    assert record["examples"] and len(page.find("img")) == 3 * len(record["examples"])
    for e in record["examples"]:
        assert f"label {e['label']} -> predicted {e['prediction']}" in text
    assert all(img.get("alt") for img in page.find("img"))


def test_per_class_heatmap_and_most_vulnerable_classes(record):
    page = Page(render.report_html(record))
    text = page.alltext
    per_class = record["classes"]["robust_accuracy"]["robust_accuracy:worst-linf@0.1"]  # the gated worst case
    lowest = sorted((v, i) for i, v in enumerate(per_class) if v is not None)[:3]
    sentence = re.search(r"Most vulnerable classes at worst-linf@0\.1:(.*?)\.\s*$", text, re.M | re.S)
    assert sentence, text[:2000]
    named = [int(c) for c in re.findall(r"class (\d+) \(robust accuracy", sentence.group(1))]
    assert named == [i for _, i in lowest]
    heat = [a for t, a in page.tags if t == "td" and a.get("class") == "heat"]
    assert len(heat) == 10 * (1 + len(record["classes"]["robust_accuracy"]))  # 10 digits x (clean + worst groups)


def test_charts_have_axes_titles_and_a_legend_entry_per_attack(record):
    from harness.verdicts.metrics import curves

    html = render.report_html(record)
    for norm, lines in curves(record).items():
        svg = render.curve_svg(norm, lines)
        assert svg in html
        assert f"Robust accuracy against {norm} epsilon" in svg and f"epsilon ({norm})" in svg and "robust accuracy</text>" in svg
        legend = re.findall(r'<g class="legend">.*?<title>(.*?)</title>', svg)
        assert sorted(legend) == sorted(lines) and "worst" in legend
        # dashed: the worst case's legend sample, and its line when it has more than one point
        assert svg.count('stroke-dasharray="6 4"') == 1 + (len(lines["worst"]) > 1)
        for ticks in ("0.0", "0.2", "1.0"):
            assert f">{ticks}</text>" in svg


def test_curve_svg_ticks_escaping_and_empty_input():
    svg = render.curve_svg("l2", {"a<b>": [(0.0, 1.0), (0.5, 0.5), (1.0, 0.1)], "worst": [(0.5, 0.4)]})
    assert ">0.25</text>" in svg and ">1</text>" in svg  # nice ticks up to the largest epsilon
    assert "a&lt;b&gt;" in svg and "<b>" not in svg and "worst case" in svg
    assert svg.count("<circle") == 3 and svg.count("<rect") == 1 and svg.count("<polyline") == 1  # one point: no line
    assert "no points" in render.curve_svg("linf", {})
    long = render.curve_svg("linf", {"x" * 80: [(0.1, 0.5)]})
    assert "x" * 31 + "…" in long and "x" * 80 in long  # truncated in the legend, whole in its tooltip


def _old_record(**overrides) -> dict:
    """A scorecard as the first schema-1 versions wrote it: none of the keys added since."""
    rec = {
        "schema_version": 1, "name": "old", "passed": True, "verdict": "pass",
        "metrics": {"clean_accuracy": 0.97, "robust_accuracy:pgd-linf@0.1": 0.4},
        "gates": [{"metric": "clean_accuracy", "op": ">=", "threshold": 0.9, "value": 0.97, "ci95": [0.95, 0.98],
                   "passed": True, "verdict": "pass", "baseline": None}],
        "attacks": [{"id": "pgd-linf", "name": "pgd", "backend": "native", "norm": "linf", "epsilon": "0.1",
                     "robust_accuracy": 0.4, "attack_success_rate": 0.59, "n": 100, "seconds": 1.5}],
        "probes": [], "defenses": [],
        "checks": [{"name": "budget", "status": "pass", "detail": "every example inside its budget"}],
        "provenance": {"model_sha256": "a" * 64, "seed": 0, "device": "cpu", "duration_s": 2.0},
    }
    rec.update(overrides)
    return rec


def test_an_old_record_renders_without_the_sections_it_has_no_data_for():
    rec = _old_record()
    page = audit(render.report_html(rec))
    assert {"gates", "attacks", "metrics", "checks", "provenance"} <= page.ids()
    assert not page.ids() & {"curves", "classes", "examples", "stages", "probes", "defenses"}
    assert not page.find("img") and not page.find("svg")
    assert "1 of 1 gate(s) passed" in page.alltext and "0.5900" in page.alltext
    assert render.compact_html(rec).startswith('<div class="hr-card hr-compact">')
    ET.fromstring(render.junit_xml(rec))
    assert "| pgd-linf | linf | 0.1 | 0.4000 | 0.5900 | 1.50 |" in render.summary_md(rec)


def _hostile_record() -> dict:
    rec = _old_record(name=HOSTILE, passed=False, verdict=HOSTILE)
    rec["metrics"][f"robust_accuracy:{ATTR_BREAK}@0.1"] = 0.3
    rec["gates"].append({"metric": f"robust_accuracy:{ATTR_BREAK}@0.1", "op": ">=", "threshold": 0.5, "value": 0.3,
                         "ci95": [0.2, 0.4], "passed": False, "verdict": "fail", "baseline": None, "reason": HOSTILE})
    rec["attacks"].append({**rec["attacks"][0], "id": ATTR_BREAK, "epsilon": HOSTILE, "epsilon_value": 0.1,
                           "params": {"k": HOSTILE}, "stages": [{"attack": HOSTILE, "n_attacked": 3, "n_broken": 1,
                                                                 "robust_accuracy": 0.2, "seconds": 0.1}]})
    rec["checks"].append({"name": HOSTILE, "status": "fail", "detail": f"{HOSTILE} | pipe\nnewline \x01 control"})
    rec["provenance"].update(config_file=f"/tmp/{HOSTILE}/suite.yaml", versions={HOSTILE: HOSTILE},
                             artifacts=[{"role": "weights", "path": f"/tmp/{HOSTILE}.pt", "kind": "file", "sha256": "b" * 64}])
    rec["classes"] = {"ids": [0, 1], "names": [HOSTILE, "b"], "n": [3, 4], "clean_accuracy": [1.0, 0.5],
                      "robust_accuracy": {f"robust_accuracy:worst-linf@{HOSTILE}": [0.3, None]}}
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + bytes(8) + b"\x08\x00\x00\x00\x00").decode()
    bad = {"attack": HOSTILE, "norm": "linf", "epsilon": HOSTILE, "sample": 1, "label": HOSTILE, "prediction": 2,
           "distance": 0.1, "original": png, "adversarial": png, "amplification": 5.0}
    rec["examples"] = [{**bad, "perturbation": '"><script>alert(3)</script>'},  # not base64: left out
                       {**bad, "perturbation": base64.b64encode(b"GIF89a" + bytes(30)).decode()}]  # not a PNG
    rec["probes"] = [{"name": HOSTILE, "fraction": 0.05, "detail": {"x": HOSTILE}}]
    rec["defenses"] = [{"name": "jpeg", "quality": 75}, {"name": HOSTILE, "note": None}]
    return rec


@pytest.mark.parametrize("view", ["report", "compact"])
def test_hostile_strings_are_escaped_never_live(view):
    rec = _hostile_record()
    html = render.report_html(rec) if view == "report" else render.compact_html(rec)
    page = audit(html)  # no script element, no on* attribute, no load
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert HOSTILE in page.alltext  # shown to the reader as text, verbatim
    assert 'onmouseover="alert(2)' not in html
    if view == "report":
        assert {"classes", "probes", "defenses", "stages"} <= page.ids() and "examples" not in page.ids()
        assert "<td>75</td><td>–</td>" in html  # defenses: the union of the records' keys, a missing one a dash
        assert f"/tmp/{HOSTILE}.pt" in page.alltext and "class <script>" in page.alltext


def test_hostile_strings_in_junit_and_markdown():
    rec = _hostile_record()
    root = ET.fromstring(render.junit_xml(rec))  # control characters dropped: still well-formed XML
    assert root.get("name") == f"harness {HOSTILE}"
    md = render.summary_md(rec)
    assert "<script>" not in md and "\\<script\\>" in md
    for table in _md_tables(md):
        _assert_gfm_table(table)


def _gated_record(**overrides) -> dict:
    rec = _old_record(passed=False, verdict="fail")
    rec["gates"] = [
        {"metric": "clean_accuracy", "op": ">=", "threshold": 0.9, "value": 0.97, "ci95": [0.95, 0.98], "passed": True,
         "verdict": "pass", "baseline": 0.98, "reason": ""},
        {"metric": "robust_accuracy:pgd-linf@0.1", "op": "max_drop", "threshold": 0.02, "value": 0.4, "ci95": [0.31, 0.5],
         "passed": False, "verdict": "fail", "baseline": 0.43, "delta": -0.03, "drop": 0.03, "drop_ci95": [0.021, 0.04],
         "p_value": 0.0123, "test": "mcnemar", "flipped": {"worse": [4, 9], "better": [], "n_worse": 3, "n_better": 0},
         "reason": "dropped 0.0300 from the baseline 0.4300", "on_inconclusive": "fail"},
        {"metric": "robust_accuracy:pgd-linf@0.1", "op": ">=", "threshold": 0.4, "value": 0.4, "ci95": [0.31, 0.5],
         "passed": True, "verdict": "inconclusive", "baseline": None, "on_inconclusive": "pass",
         "reason": "the minimum 0.4 lies inside the 95% CI (on_inconclusive: pass)"},
        {"metric": "clean_accuracy", "op": "<=", "threshold": 0.96, "value": 0.97, "ci95": [0.95, 0.98], "passed": False,
         "verdict": "inconclusive", "baseline": None, "on_inconclusive": "fail", "reason": "too few samples (on_inconclusive: fail)"},
    ]
    rec["checks"] += [{"name": "more-steps", "status": "warn", "detail": "5% more broken"},
                      {"name": "vanishing-gradients", "status": "fail", "detail": "zero gradient at 40% of points"}]
    rec.update(overrides)
    return rec


def test_gates_table_shows_baseline_delta_and_drop():
    html = render.report_html(_gated_record())
    text = Page(html).alltext
    assert "−0.0100" in text and "−0.0300" in text  # value - baseline; the recorded delta
    assert "drop 0.0300 [0.0210, 0.0400]" in text and "mcnemar p 0.0123" in text
    assert "got worse: 3 sample(s) (4, 9, ...)" in text
    assert "passed by on_inconclusive: pass" in text and "failed by on_inconclusive: fail" in text
    banner = Page(html[html.index("<header"):html.index("</header>")]).alltext
    assert "FAIL" in banner and "2 of 4 gate(s) passed" in banner
    assert "check vanishing-gradients: zero gradient at 40% of points" in banner
    assert "gate robust_accuracy:pgd-linf@0.1 max_drop 0.02: dropped 0.0300" in banner
    assert "gate clean_accuracy >= 0.9" not in banner  # a gate that passed is no reason


def test_junit_counts_match_testcases_and_failures(record):
    for rec in (record, _gated_record(), _old_record()):
        root = ET.fromstring(render.junit_xml(rec))
        suites = root.findall("testsuite")
        assert [s.get("name").split(".")[0] for s in suites] == ["gates", "checks"]
        for s in suites:
            cases = s.findall("testcase")
            assert int(s.get("tests")) == len(cases) and int(s.get("failures")) == len(s.findall("testcase/failure"))
            assert all(c.get("name") and c.get("classname") for c in cases)
            assert all(f.get("message") for f in s.iter("failure"))
        assert int(root.get("tests")) == len(root.findall("testsuite/testcase"))
        assert int(root.get("failures")) == len(root.findall("testsuite/testcase/failure"))
        gates = suites[0].findall("testcase")
        assert len(gates) == len(rec["gates"])
        assert [c.find("failure") is not None for c in gates] == [not g["passed"] for g in rec["gates"]]
    gated = ET.fromstring(render.junit_xml(_gated_record()))
    out = [c.findtext("system-out") for c in gated.iter("testcase")]
    assert any(o and o.startswith("passed by on_inconclusive: pass") for o in out)
    assert any(o == "warning: 5% more broken" for o in out)


def _md_tables(md: str) -> list[list[str]]:
    tables, current = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def _cells(row: str) -> list[str]:
    assert row.startswith("| ") and row.endswith(" |"), row
    return re.split(r"(?<!\\) \| ", row[2:-2])  # a pipe a user wrote is escaped and does not split


def _assert_gfm_table(rows: list[str]) -> None:
    header, delimiter, *body = rows
    width = len(_cells(header))
    assert all(re.fullmatch(r":?-{3,}:?", c) for c in _cells(delimiter)) and len(_cells(delimiter)) == width
    assert all(len(_cells(r)) == width for r in body), rows
    assert all(not re.search(r"(?<!\\)\|", "".join(_cells(r))) for r in rows)


def test_summary_md_tables_are_well_formed(record):
    for rec in (record, _gated_record(), _old_record(), _hostile_record()):
        md = render.summary_md(rec)
        tables = _md_tables(md)
        assert len(tables) == 2
        for t in tables:
            _assert_gfm_table(t)
        assert len(tables[0]) == 2 + len(rec["gates"]) and len(tables[1]) == 2 + len(rec["attacks"])


def test_summary_md_renders_as_tables_in_a_markdown_parser(record):
    markdown_it = pytest.importorskip("markdown_it")
    md = markdown_it.MarkdownIt("commonmark").enable("table")
    for rec in (record, _gated_record(), _hostile_record()):
        html = md.render(render.summary_md(rec))
        assert html.count("<table>") == 2 and "<script>" not in html


def test_compact_view_is_a_scoped_div(record):
    html = render.compact_html(record)
    assert html.startswith('<div class="hr-card hr-compact">') and html.rstrip().endswith("</div>")
    assert "<html" not in html and "<body" not in html
    page = audit(html)
    assert "gates" in page.ids() and len(page.find("svg")) == 2 and not page.find("img")
    assert "provenance" not in page.ids() and "classes" not in page.ids()
    css = html[html.index("<style>") + 7:html.index("</style>")]
    selectors = [s.strip() for block in re.findall(r"([^{}]+)\{", css) for s in block.split(",")]
    selectors = [s for s in selectors if not s.startswith("@")]
    assert selectors and all(s.startswith(".hr-card") for s in selectors), [s for s in selectors if not s.startswith(".hr-card")]


def test_repr_html_is_the_compact_view(record):
    from harness.reports.scorecard import Scorecard

    card = Scorecard(copy.deepcopy(record))
    assert card._repr_html_() == render.compact_html(card.to_dict())


def test_style_is_responsive_and_prints():
    css = render.style_css()
    assert "@media print" in css and "@media (max-width: 640px)" in css
    assert "overflow-x: auto" in css and "image-rendering: pixelated" in css and "break-inside: avoid" in css
    print_rules = css[css.index("@media print"):]
    assert "background: none" in print_rules and "position: sticky" not in css


def test_many_classes_show_the_most_vulnerable_only():
    n = 100
    worst = [round((i * 37 % n) / n, 2) for i in range(n)]  # a permutation of 0.00 .. 0.99
    rec = _old_record(classes={"ids": list(range(n)), "n": [5] * n, "clean_accuracy": [1.0] * n,
                               "robust_accuracy": {"robust_accuracy:worst-linf@0.1": worst}})
    page = Page(render.report_html(rec))
    assert "Showing the 30 most vulnerable of 100 classes." in page.alltext
    rows = [a for t, a in page.tags if t == "td" and a.get("class") == "heat"]
    assert len(rows) == 30 * 2
    order = sorted(range(n), key=lambda i: worst[i])
    assert f"class {order[0]} (robust accuracy 0.000 on 5 samples), class {order[1]} (robust accuracy 0.010" in page.alltext


def test_saved_outputs_are_the_renderings(record, tmp_path):
    from harness.reports.scorecard import Scorecard

    Scorecard(copy.deepcopy(record)).save(tmp_path)
    rec = {**record, "provenance": {k: v for k, v in record["provenance"].items() if k != "outputs"}}
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == render.report_html(rec)
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == render.summary_md(rec)
