"""The privacy section of report.html (membership inference: rates with their intervals and a log-log ROC;
extraction: fidelity against the query budget, undefended and per output defense) and the privacy
curves of `harness compare`, rendered from hand-made records of the shape the privacy probes write."""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import pytest

from harness.records.scorecard import SCHEMA_VERSION
from harness.reports import render
from harness.reports.comparison import DIRECTION, Comparison, compare_records
from tests.test_report import Page as ReportPage
from harness.reports.scorecard import Scorecard
from harness.verdicts.metrics import metric_intervals

HOSTILE = '<script>alert(1)</script>"x'
ROC_FPR = [0.0, 0.0, 0.001, 0.01, 0.1, 1.0]
ROC_TPR = [0.0, 0.005, 0.02, 0.21, 0.4, 1.0]
FIDELITY = {100: 0.6, 1000: 0.8, 10000: 0.91}


def membership(pid: str = "mia", *, n_nonmembers: int = 10000, fpr=ROC_FPR, tpr=ROC_TPR, auc: float = 0.61,
               auc_ci=(0.6012, 0.6188), tpr_at=0.21, tpr_ci=(0.1874, 0.2331)) -> dict[str, Any]:
    """A LiRA record as the spec gives it: the 0.01 level resolved, the 0.001 level not."""
    half = n_nonmembers
    return {
        "id": pid, "name": "membership-inference", "kind": "membership", "method": "lira", "variant": "online",
        "variance": "per-example", "target": "shadows", "shadow_models": 16, "n_examples": 1347,
        "n_trials": 4 * half, "n_members": 2 * half, "n_nonmembers": 2 * half,
        "calibration": {"n_members": half, "n_nonmembers": half}, "evaluation": {"n_members": half, "n_nonmembers": half},
        "levels": [{"fpr": 0.01, "label": "0.01", "resolved": True, "threshold": 1.23, "tpr": tpr_at, "fpr_measured": 0.011},
                   {"fpr": 0.001, "label": "0.001", "resolved": False, "why": "only 4 non-member trials above the threshold"}],
        "auc": auc, "advantage": 0.18, "roc": {"fpr": list(fpr), "tpr": list(tpr)},
        "shadow_accuracy": {"members": 1.0, "nonmembers": 0.95}, "keep_file": f"privacy/{pid}-keep.json", "seconds": 40.2,
        "metrics": {f"tpr_at_fpr:{pid}@0.01": tpr_at, f"auc:{pid}": auc, f"advantage:{pid}": 0.18},
        "metric_intervals": {f"tpr_at_fpr:{pid}@0.01": {"ci95": list(tpr_ci), "method": "wilson", "n": half},
                             f"auc:{pid}": {"ci95": list(auc_ci), "method": "auroc-score", "n": 2 * half},
                             f"advantage:{pid}": {"ci95": [0.1611, 0.1987], "method": "bootstrap", "n": 2 * half}},
    }


def extraction(pid: str = "steal", fidelity: dict[int, float] = FIDELITY, defenses=("labels-only", "top-1"),
               drop: float = 0.06) -> list[dict[str, Any]]:
    """One record per budget, each defense `drop` (labels-only) or twice that (the next) below the undefended fidelity."""
    out = []
    for budget, f in fidelity.items():
        ds = [{"defense": d, "fidelity": round(f - drop * (i + 1), 4), "stolen_accuracy": round(f - drop * (i + 1) - 0.01, 4),
               "fidelity_drop": round(drop * (i + 1), 4), "victim_accuracy": 0.98 - 0.01 * i, "clean_accuracy_cost": 0.01 * i}
              for i, d in enumerate(defenses)]
        metrics = {f"fidelity:{pid}@{budget}": f, f"stolen_accuracy:{pid}@{budget}": round(f - 0.01, 4)}
        intervals = {f"fidelity:{pid}@{budget}": {"ci95": [round(f - 0.0234, 4), round(f + 0.0211, 4)], "method": "wilson", "n": 450},
                     f"stolen_accuracy:{pid}@{budget}": {"ci95": [round(f - 0.0342, 4), round(f + 0.0198, 4)], "method": "wilson", "n": 450}}
        for d in ds:
            label = d["defense"]
            metrics.update({f"fidelity:{pid}/{label}@{budget}": d["fidelity"], f"fidelity_drop:{pid}/{label}@{budget}": d["fidelity_drop"],
                            f"clean_accuracy_cost:{pid}/{label}": d["clean_accuracy_cost"]})
            intervals[f"fidelity:{pid}/{label}@{budget}"] = {"ci95": [round(d["fidelity"] - 0.03, 4), round(d["fidelity"] + 0.02, 4)],
                                                            "method": "wilson", "n": 450}
        out.append({"id": pid, "name": "extraction", "kind": "extraction", "queries": "patches", "answers": "probabilities",
                    "budget": budget, "thief": "config", "n_test": 450, "victim_accuracy": 0.98, "fidelity": f,
                    "stolen_accuracy": round(f - 0.01, 4), "defenses": ds, "seconds": 12.0, "metrics": metrics,
                    "metric_intervals": intervals})
    return out


def card(probes: list[dict[str, Any]], name: str = "privacy") -> dict[str, Any]:
    """A scorecard record around `probes`, with the metrics and intervals the judge stage would lift from them."""
    rec = {
        "schema_version": SCHEMA_VERSION, "name": name, "passed": True, "verdict": "pass",
        "metrics": {"clean_accuracy": 0.97}, "gates": [], "attacks": [], "probes": probes, "defenses": [],
        "checks": [{"name": "budget", "status": "pass", "detail": "every example inside its budget"}],
        "provenance": {"model_sha256": "a" * 64, "seed": 0, "device": "cpu", "duration_s": 2.0,
                       "data_source": "builtin:digits", "split": "test"},
    }
    for p in probes:
        rec["metrics"].update(p.get("metrics") or {})
    rec["intervals"] = metric_intervals(rec)
    return rec


# --- reading the page back ------------------------------------------------------------------------------

class Page(ReportPage):
    """tests.test_report's page (start tags with attributes, the text), and each table by class."""

    def __init__(self, html: str) -> None:
        self.tables: dict[str, list[list[str]]] = {}
        self._table: list[str] = []
        self._cell: list[str] | None = None
        super().__init__(html)

    def handle_starttag(self, tag, attrs):
        super().handle_starttag(tag, attrs)
        a = self.tags[-1][1]
        if tag == "table":
            self._table.append(a.get("class", ""))
            self.tables.setdefault(self._table[-1], [])
        elif tag == "tr" and self._table:
            self.tables[self._table[-1]].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table[-1]][-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "table" and self._table:
            self._table.pop()

    def handle_data(self, data):
        super().handle_data(data)
        if self._cell is not None:
            self._cell.append(data)


def figures(html: str, cls: str) -> list[str]:
    """The inner HTML of each <figure class="cls" ...> (an SVG never nests a figure)."""
    return re.findall(rf'<figure class="{re.escape(cls)}"[^>]*>(.*?)</figure>', html, re.S)


class Chart:
    """One SVG chart: its plot area, its tick labels with their pixel positions, its polylines by name."""

    def __init__(self, svg: str) -> None:
        self.svg = svg
        page = Page(svg)
        (area,) = [a for a in page.find("rect") if a.get("class") == "plot-area"]
        self.left, self.top = float(area["x"]), float(area["y"])
        self.width, self.height = float(area["width"]), float(area["height"])
        self.xticks = {label: float(x) for x, label in re.findall(r'<text class="xtick" x="([\d.]+)"[^>]*>([^<]*)</text>', svg)}
        self.yticks = {label: float(y) - 4 for y, label in re.findall(r'<text class="ytick" x="[\d.]+" y="([\d.]+)"[^>]*>([^<]*)</text>', svg)}
        self.lines = {a["data-line"]: [tuple(map(float, p.split(","))) for p in a["points"].split()] for a in page.find("polyline")}

    def log_x(self, v: float, lo: float, hi: float = 1.0) -> float:
        return self.left + self.width * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    def log_y(self, v: float, lo: float, hi: float = 1.0) -> float:
        return self.top + self.height * (1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))


def roc_chart(html: str, index: int = 0) -> Chart:
    return Chart(figures(html, "roc")[index])


# --- the single-run report ---------------------------------------------------------------------------------

def test_the_privacy_section_has_its_nav_link_and_leaves_poisoning_out_when_there_is_none():
    html = render.report_html(card([membership()] + extraction()))
    page = Page(html)
    assert "privacy" in page.ids() and "probes" not in page.ids()  # no poisoning record: no empty Poisoning section
    assert "#privacy" in [a.get("href") for a in page.find("a")]
    assert len(figures(html, "roc")) == 1 and len(figures(html, "extraction-fidelity")) == 1
    assert "correlated" in page.alltext  # target: shadows pools the trials of every shadow model


def test_poisoning_still_renders_beside_privacy():
    poison = {"id": "badnets", "name": "badnets", "kind": "probe", "fraction": "0.1", "fraction_value": 0.1, "n_poisoned": 12,
              "clean_accuracy": 0.95, "clean_accuracy_baseline": 0.97, "attack_success_rate": 0.9, "scans": []}
    rec = card([poison, membership()])
    rec["intervals"]["attack_success_rate:badnets@0.1"] = [0.8123, 0.9456]
    html = render.report_html(rec)
    page = Page(html)
    assert {"probes", "privacy"} <= page.ids()
    assert html.index('id="probes"') < html.index('id="privacy"')
    assert "[0.812, 0.946]" in page.alltext and "badnets: against the poisoning fraction" in html


def test_roc_axes_are_log10_from_1e_minus_4_to_1():
    """10000 evaluation non-members: the axes start at 1e-4; each decade is a quarter of the plot."""
    chart = roc_chart(render.report_html(card([membership(n_nonmembers=10000)])))
    assert list(chart.xticks) == ["10⁻⁴", "10⁻³", "10⁻²", "10⁻¹", "1"] == list(chart.yticks)
    for k, label in enumerate(["10⁻⁴", "10⁻³", "10⁻²", "10⁻¹", "1"]):
        assert chart.xticks[label] == pytest.approx(chart.left + chart.width * k / 4, abs=0.06)
        assert chart.yticks[label] == pytest.approx(chart.top + chart.height * (1 - k / 4), abs=0.06)
    (roc,) = [v for k, v in chart.lines.items() if k.startswith("ROC")]
    # (fpr 0.01, tpr 0.21): the middle of the x axis, log10(0.21) = -0.678 decades from the top
    x, y = roc[3]
    assert x == pytest.approx(chart.left + chart.width / 2, abs=0.06)
    assert y == pytest.approx(chart.top + chart.height * (-math.log10(0.21)) / 4, abs=0.06)
    assert y == pytest.approx(chart.log_y(0.21, 1e-4), abs=0.06)
    assert '<line class="chance"' in chart.svg  # the chance diagonal, corner to corner
    chance = re.search(r'<line class="chance" x1="([\d.]+)" y1="([\d.]+)" x2="([\d.]+)" y2="([\d.]+)"', chart.svg)
    assert [float(v) for v in chance.groups()] == pytest.approx(
        [chart.left, chart.top + chart.height, chart.left + chart.width, chart.top], abs=0.06)


def test_rates_of_zero_are_clipped_to_the_axis_minimum_not_dropped():
    chart = roc_chart(render.report_html(card([membership()])))
    (roc,) = [v for k, v in chart.lines.items() if k.startswith("ROC")]
    assert len(roc) == len(ROC_FPR)  # every point drawn, the two with fpr 0 too
    bottom = chart.top + chart.height
    assert roc[0] == pytest.approx((chart.left, bottom), abs=0.06)  # fpr 0, tpr 0: the corner
    assert roc[1] == pytest.approx((chart.left, chart.log_y(0.005, 1e-4)), abs=0.06)  # fpr 0, tpr 0.005: on the y axis
    assert roc[-1] == pytest.approx((chart.left + chart.width, chart.top), abs=0.06)
    assert "2 point(s) below 10⁻⁴ (a rate of 0) drawn on the axis minimum" in chart.svg


def test_the_roc_starts_at_one_over_the_non_members_when_that_is_larger():
    html = render.report_html(card([membership(n_nonmembers=500)]))
    chart = roc_chart(html)
    lo = 1 / 500
    assert list(chart.xticks) == ["10⁻²", "10⁻¹", "1"]
    assert chart.xticks["10⁻²"] == pytest.approx(chart.log_x(0.01, lo), abs=0.06)
    assert chart.xticks["10⁻²"] - chart.left == pytest.approx(chart.width * math.log10(5) / math.log10(500), abs=0.06)
    (roc,) = [v for k, v in chart.lines.items() if k.startswith("ROC")]
    assert roc[2] == pytest.approx((chart.left, chart.log_y(0.02, lo)), abs=0.06)  # fpr 0.001 < 1/500: clipped too
    assert "3 point(s)" in chart.svg and "from 1/500 ≈ 0.002" in Page(html).alltext


def test_the_rates_table_prints_the_records_intervals_and_says_what_is_not_resolved():
    page = Page(render.report_html(card([membership()])))
    rows = {r[0].split(" tpr_at")[0].split(" auc:")[0].split(" advantage:")[0]: r[1:] for r in page.tables["rates"][1:]}
    assert rows["TPR at FPR 0.01"][:2] == ["0.2100", "[0.187, 0.233]"]
    assert "measured FPR 0.0110" in rows["TPR at FPR 0.01"][2]
    assert rows["TPR at FPR 0.001"] == ["not resolved", "–", "only 4 non-member trials above the threshold"]
    assert rows["AUC"][:2] == ["0.6100", "[0.601, 0.619]"]
    assert rows["advantage"][:2] == ["0.1800", "[0.161, 0.199]"]
    settings = dict(r for r in page.tables["settings"] if len(r) == 2)
    assert settings["shadow models"] == "16" and settings["method"] == "lira" and settings["variant"] == "online"
    assert settings["evaluation trials"] == "10000 member, 10000 non-member"


def test_the_extraction_charts_have_one_line_per_answer_kind_on_a_log_budget_axis():
    html = render.report_html(card(extraction()))
    kinds = ["undefended (probabilities)", "labels-only", "top-1"]
    for cls, key in (("extraction-fidelity", "fidelity"), ("extraction-stolen_accuracy", "stolen_accuracy")):
        (svg,) = figures(html, cls)
        chart = Chart(svg)
        assert list(chart.lines) == kinds  # undefended and each defense, nothing else
        assert list(chart.xticks) == ["100", "1000", "10000"] and "query budget (log)" in svg
        undefended = chart.lines[kinds[0]]
        assert [x for x, _ in undefended] == pytest.approx([chart.left, chart.left + chart.width / 2, chart.left + chart.width], abs=0.06)
        expected = [FIDELITY[b] - (0.01 if key == "stolen_accuracy" else 0.0) for b in FIDELITY]
        assert [y for _, y in undefended] == pytest.approx([chart.top + chart.height * (1 - v) for v in expected], abs=0.06)
        top1 = chart.lines["top-1"]  # two steps of 0.06 below the undefended fidelity
        assert [y for _, y in top1] == pytest.approx([chart.top + chart.height * (1 - v + 0.12) for v in expected], abs=0.06)
    assert 'class="reference"' in figures(html, "extraction-stolen_accuracy")[0]  # the victim's accuracy, for scale
    assert 'class="reference"' not in figures(html, "extraction-fidelity")[0]


def test_the_budget_axis_is_linear_when_budgets_span_ten_times_or_less():
    html = render.report_html(card(extraction(fidelity={250: 0.7, 1000: 0.85})))
    chart = Chart(figures(html, "extraction-fidelity")[0])
    assert "query budget (log)" not in chart.svg and "0" in chart.xticks
    x250, x1000 = (x for x, _ in chart.lines["undefended (probabilities)"])
    assert x1000 - chart.left == pytest.approx(4 * (x250 - chart.left), abs=0.3)


def test_the_extraction_table_matches_the_records():
    page = Page(render.report_html(card(extraction())))
    table = page.tables["extraction"]
    assert table[0][-2:] == ["labels-only", "top-1"] and table[1][:3] == ["fidelity", "fidelity drop", "clean-accuracy cost"]
    row = next(r for r in table[2:] if r[0] == "1000")
    assert row[:6] == ["1000", "0.8000", "[0.777, 0.821]", "0.7900", "[0.766, 0.820]", "0.9800"]
    # labels-only: fidelity 0.74 with its own interval, drop +0.06, cost 0; top-1: 0.68, +0.12, 0.01
    assert row[6:] == ["0.7400 [0.710, 0.760]", "+0.0600", "0.0000", "0.6800 [0.650, 0.700]", "+0.1200", "0.0100"]


def test_hostile_ids_and_defense_names_are_escaped():
    mia = membership(pid=HOSTILE)
    thefts = extraction(pid=HOSTILE, defenses=(HOSTILE, "top-1"))
    html = render.report_html(card([mia] + thefts))
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    page = Page(html)
    assert not page.find("script") and not [a for _, a in page.tags for k in a if k.startswith("on")]
    assert HOSTILE in page.alltext  # shown to the reader verbatim, as text
    assert HOSTILE in Chart(figures(html, "extraction-fidelity")[0]).lines  # the attribute holds it escaped, parsed back whole


# --- harness compare -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def versions() -> list[Scorecard]:
    """v1 and a v2 whose membership attack does worse (a lower ROC and AUC) and whose thief does better."""
    v1 = card([membership()] + extraction(), name="v1")
    v2 = card([membership(fpr=ROC_FPR, tpr=[0.0, 0.001, 0.004, 0.05, 0.25, 1.0], auc=0.55, auc_ci=(0.54, 0.56),
                          tpr_at=0.05, tpr_ci=(0.04, 0.06))]
              + extraction(fidelity={100: 0.65, 1000: 0.85, 10000: 0.95}, drop=0.1), name="v2")
    return [Scorecard(v1), Scorecard(v2)]


def test_directions_of_the_privacy_families():
    assert {k: DIRECTION[k] for k in ("tpr_at_fpr", "auc", "advantage", "fidelity", "stolen_accuracy", "fidelity_drop",
                                      "clean_accuracy_cost")} == {"tpr_at_fpr": -1, "auc": -1, "advantage": -1, "fidelity": -1,
                                                                  "stolen_accuracy": -1, "fidelity_drop": 1, "clean_accuracy_cost": -1}


def test_a_lower_auc_is_an_improvement_and_a_higher_fidelity_a_regression(versions):
    rec = compare_records(versions, ["v1", "v2"])
    status = {r["metric"]: r["status"][1] for r in rec["metrics"]}
    assert status["auc:mia"] == "improvement" and status["tpr_at_fpr:mia@0.01"] == "improvement"  # 0.55 below [0.6012, 0.6188]
    assert status["fidelity:steal@1000"] == "regression"  # 0.85 above [0.7766, 0.8211]
    assert status["fidelity_drop:steal/labels-only@1000"] == "improvement"  # 0.1 against 0.06 (no interval: point)
    assert status["clean_accuracy_cost:steal/labels-only"] == "neutral"  # the same cost
    html = Comparison(rec).to_html()
    cells = re.findall(r'<tr class="metric"><td>(auc:mia|fidelity:steal@1000)</td>\s*<td class="n">[^<]*<br><small>95% CI \[([\d.]+), ([\d.]+)\]'
                       r'</small></td>\s*<td class="n (\w+)"', html)
    assert sorted(cells) == [("auc:mia", "0.601", "0.619", "improvement"), ("fidelity:steal@1000", "0.777", "0.821", "regression")]


def test_the_comparison_overlays_each_versions_roc_and_fidelity_curve(versions):
    rec = compare_records(versions, ["v1", "v2"])
    (mia,) = rec["privacy"]["membership"]
    assert mia["id"] == "mia" and list(mia["lines"]) == ["v1", "v2"] and mia["floor"] == 1e-4
    assert mia["lines"]["v2"][3] == [0.01, 0.05]
    html = Comparison(rec).to_html()
    (svg,) = re.findall(r'<figure class="roc" data-probe="mia">(.*?)</figure>', html, re.S)
    chart = Chart(svg)
    assert list(chart.lines) == ["v1", "v2"] and all(len(v) == len(ROC_FPR) for v in chart.lines.values())
    assert chart.xticks["10⁻²"] == pytest.approx(chart.left + chart.width / 2, abs=0.06)
    assert chart.lines["v1"][3][1] == pytest.approx(chart.log_y(0.21, 1e-4), abs=0.06)
    assert chart.lines["v2"][3][1] == pytest.approx(chart.log_y(0.05, 1e-4), abs=0.06)
    assert chart.lines["v2"][0] == pytest.approx((chart.left, chart.top + chart.height), abs=0.06)  # (0, 0) clipped
    (svg,) = re.findall(r'<figure class="extraction" data-probe="steal">(.*?)</figure>', html, re.S)
    chart = Chart(svg)
    assert list(chart.lines) == [f"{v}: {k}" for v in ("v1", "v2") for k in ("undefended", "labels-only", "top-1")]
    assert chart.lines["v2: undefended"][1][1] == pytest.approx(chart.top + chart.height * (1 - 0.85), abs=0.06)
    colour = lambda name: re.search(rf'data-line="{re.escape(name)}"[^>]*stroke="(#[0-9a-f]+)"', svg).group(1)
    assert colour("v1: undefended") == colour("v1: top-1") != colour("v2: undefended")  # one colour per version


def test_a_comparison_without_privacy_probes_has_no_privacy_part(versions):
    plain = [Scorecard({**copy.deepcopy(v.record), "probes": []}) for v in versions]
    rec = compare_records(plain, ["v1", "v2"])
    assert rec["privacy"] == {"membership": [], "extraction": []}
    assert "<h3>Privacy</h3>" not in Comparison(rec).to_html()
