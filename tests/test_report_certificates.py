"""The Certificates section of report.html (certified accuracy against the radius beside the empirical
robust accuracy at each level, the levels table with its intervals, the soundness check) and the
certificates part of `harness compare`, rendered from hand-made records of the shape
harness.evaluation.certificates writes."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from harness.records.scorecard import SCHEMA_VERSION
from harness.reports import render
from harness.reports.certificates import certificates_section, step_points
from harness.reports.comparison import DIRECTION, Comparison, compare_records
from harness.reports.scorecard import Scorecard
from harness.verdicts.metrics import metric_intervals
from tests.test_report import audit
from tests.test_report_privacy import Chart, Page, figures

HOSTILE = '<script>x</script>"q'
RADII = [0.0, 0.1, 0.25, 0.4, 0.5, 0.75]
CERTIFIED = [0.9, 0.86, 0.8, 0.62, 0.55, 0.2]


def smoothing(cid: str = "smoothing", *, certified=CERTIFIED, at=(0.8, 0.55), ci=((0.74, 0.85), (0.48, 0.62)),
              empirical=(0.85, 0.70), violations=(0, 0), soundness="pass", detail="0 confident violations") -> dict[str, Any]:
    """A randomized-smoothing record: levels 0.25 and 0.5 on 200 points, a curve through RADII."""
    levels = [{"label": label, "value": value, "certified_accuracy": a, "n_certified": round(200 * a),
               "empirical_robust_accuracy": e, "n_empirical_robust": round(200 * e), "n_violations": v, "allowed_violations": 2}
              for label, value, a, e, v in zip(("0.25", "0.5"), (0.25, 0.5), at, empirical, violations)]
    metrics = {f"certified_accuracy:{cid}@{lv['label']}": lv["certified_accuracy"] for lv in levels}
    metrics.update({f"abstain_rate:{cid}": 0.04, f"clean_accuracy:{cid}": 0.93})
    intervals = {f"certified_accuracy:{cid}@{lv['label']}": {"ci95": list(c), "method": "wilson", "n": 200, "alpha": 0.001}
                 for lv, c in zip(levels, ci)}
    intervals[f"abstain_rate:{cid}"] = {"ci95": [0.0204, 0.0771], "method": "wilson", "n": 200, "alpha": 0.001}
    intervals[f"clean_accuracy:{cid}"] = {"ci95": [0.8857, 0.9578], "method": "wilson", "n": 200, "alpha": 0.001}
    return {"id": cid, "name": "randomized-smoothing", "kind": "certificate", "norm": "l2",
            "params": {"sigma": 0.25, "n0": 100, "n": 10000, "alpha": 0.001, "batch": 1000, "attack_steps": 20, "attack_eot": 16,
                       "check_n": 1000},
            "alpha": 0.001, "n_points": 200, "clean_accuracy": 0.93, "n_correct": 186, "abstain_rate": 0.04, "n_abstain": 8,
            "certify_abstain_rate": 0.05, "levels": levels, "curve": {"radius": list(RADII), "certified_accuracy": list(certified)},
            "soundness": {"name": f"certificate-soundness:{cid}", "status": soundness, "detail": detail},
            "seconds": 12.3, "metrics": metrics, "metric_intervals": intervals}


def interval_bounds(cid: str = "ibp") -> dict[str, Any]:
    levels = [{"label": "0.01", "value": 0.01, "certified_accuracy": 0.6, "n_certified": 120, "empirical_robust_accuracy": 0.9,
               "n_empirical_robust": 180, "n_violations": 0, "allowed_violations": 0},
              {"label": "0.05", "value": 0.05, "certified_accuracy": 0.1, "n_certified": 20, "empirical_robust_accuracy": 0.6,
               "n_empirical_robust": 120, "n_violations": 0, "allowed_violations": 0}]
    return {"id": cid, "name": "interval-bounds", "kind": "certificate", "norm": "linf", "method": "ibp",
            "params": {"method": "ibp", "attack_steps": 50, "attack_restarts": 1}, "alpha": 0.0, "n_points": 200,
            "clean_accuracy": 0.95, "n_correct": 190, "levels": levels,
            "curve": {"radius": [0.01, 0.05], "certified_accuracy": [0.6, 0.1]},
            "soundness": {"name": f"certificate-soundness:{cid}", "status": "pass", "detail": "no point proven and broken"},
            "seconds": 1.2, "metrics": {f"certified_accuracy:{cid}@0.01": 0.6, f"certified_accuracy:{cid}@0.05": 0.1},
            "metric_intervals": {f"certified_accuracy:{cid}@0.01": {"ci95": [0.5308, 0.6654], "method": "wilson", "n": 200, "alpha": 0.0},
                                 f"certified_accuracy:{cid}@0.05": {"ci95": [0.0658, 0.1490], "method": "wilson", "n": 200, "alpha": 0.0}}}


def card(certs: list[dict[str, Any]], name: str = "certified") -> dict[str, Any]:
    """A scorecard record around `certs`, with the metrics, checks and intervals a run lifts from them."""
    rec = {
        "schema_version": SCHEMA_VERSION, "name": name, "passed": True, "verdict": "pass",
        "metrics": {"clean_accuracy": 0.97}, "gates": [], "attacks": [], "probes": [], "defenses": [], "certificates": certs,
        "checks": [c["soundness"] for c in certs],
        "provenance": {"model_sha256": "a" * 64, "seed": 0, "device": "cpu", "duration_s": 2.0, "samples": 200,
                       "data_source": "builtin:digits", "split": "test"},
    }
    for c in certs:
        rec["metrics"].update(c["metrics"])
    rec["intervals"] = metric_intervals(rec)
    return rec


def flat(points) -> list[float]:
    """[(x, y), ...] as [x, y, ...]: pytest.approx compares flat sequences only."""
    return [v for p in points for v in p]


def chart(html: str, index: int = 0) -> Chart:
    return Chart(figures(html, "certified")[index])


def markers(svg: str, series: str) -> list[tuple[float, float]]:
    """The (cx, cy) of the circles a series draws (their tooltips start with the series name)."""
    return [(float(x), float(y)) for x, y in
            re.findall(rf'<circle cx="([\d.]+)" cy="([\d.]+)" r="3.5" fill="[^"]+"><title>{re.escape(series)}', svg)]


# --- the single-run report ---------------------------------------------------------------------------------

def test_the_section_and_its_nav_link_exist_one_chart_per_certificate():
    html = render.report_html(card([smoothing(), interval_bounds()]))
    page = audit(html)
    assert "certificates" in page.ids() and "#certificates" in [a.get("href") for a in page.find("a")]
    assert len(figures(html, "certified")) == 2
    heads = [t for t in re.findall(r'<h3 class="certificate"[^>]*>(.*?)</h3>', html)]
    assert "smoothing" in heads[0] and "randomized-smoothing: l2, sigma 0.25, n 10000, alpha 0.001" in heads[0]
    assert "ibp" in heads[1] and "interval-bounds: linf, method ibp" in heads[1]
    assert html.index('id="checks"') < html.index('id="certificates"') < html.index('id="provenance"')


def test_the_smoothing_curve_is_a_step_through_the_records_points():
    c = chart(render.report_html(card([smoothing()])))
    # x: 0 to 0.8 (the largest radius 0.75, rounded up to a 0.2 step); y: 0 to 1
    assert list(c.xticks) == ["0", "0.2", "0.4", "0.6", "0.8"] and list(c.yticks) == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    x = lambda r: c.left + c.width * r / 0.8
    y = lambda a: c.top + c.height * (1 - a)
    line = c.lines["certified accuracy"]
    # every recorded point is on it, each drop drawn as a vertical edge at the previous radius
    expected = [(0.0, 0.9), (0.0, 0.86), (0.1, 0.86), (0.1, 0.8), (0.25, 0.8), (0.25, 0.62), (0.4, 0.62), (0.4, 0.55),
                (0.5, 0.55), (0.5, 0.2), (0.75, 0.2), (0.75, 0.0)]  # beyond the largest certified radius: none
    assert flat(line) == pytest.approx(flat((x(r), y(a)) for r, a in expected), abs=0.06)
    assert line[4] == pytest.approx((58 + 380 * 0.25 / 0.8, 34 + c.height * 0.2), abs=0.06)  # (0.25, 0.80): 118.75 px, 20% down
    assert "certified radius (l2)" in c.svg and "accuracy" in c.svg
    # the attack's figures: a dashed line with a marker at each level's radius
    (name,) = [k for k in c.lines if k.startswith("empirical robust accuracy")]
    assert flat(c.lines[name]) == pytest.approx(flat([(x(0.25), y(0.85)), (x(0.5), y(0.70))]), abs=0.06)
    assert flat(markers(c.svg, "empirical robust accuracy")) == pytest.approx(flat([(x(0.25), y(0.85)), (x(0.5), y(0.70))]), abs=0.06)
    assert re.search(rf'data-line="{re.escape(name)}"[^>]*stroke-dasharray="6 4"', c.svg)
    assert not markers(c.svg, "certified accuracy")  # a step curve of up to 400 points carries no markers
    assert 'class="reference"' in c.svg and "clean accuracy (smoothed): 0.9300" in c.svg


def test_the_step_is_conservative_between_recorded_radii():
    assert step_points([(0.0, 0.9), (0.2, 0.9), (0.3, 0.5)]) == [(0.0, 0.9), (0.2, 0.9), (0.2, 0.5), (0.3, 0.5)]
    assert step_points([(0.0, 0.4)]) == [(0.0, 0.4)]
    # past the largest certified radius nothing is certified: to 0 there, then flat to the axis end
    assert step_points([(0.0, 0.5), (1.1376, 0.5)], end=1.5) == [(0.0, 0.5), (1.1376, 0.5), (1.1376, 0.0), (1.5, 0.0)]
    assert step_points([(0.0, 0.0)], end=0.5) == [(0.0, 0.0), (0.5, 0.0)]  # nothing certified at all


def test_a_level_beyond_the_largest_certified_radius_shows_certified_zero_beside_the_attack():
    """The constant classifier of tests/test_certificates.py: every point labelled 3 certified to 1.1376
    (20 of 40); the level 1.5 lies beyond it, where the step curve is at 0 and the attack leaves 0.5."""
    cert = smoothing()
    cert["curve"] = {"radius": [0.0, 1.1376], "certified_accuracy": [0.5, 0.5]}
    cert["levels"][1].update(value=1.5, label="1.5", certified_accuracy=0.0, empirical_robust_accuracy=0.5)
    c = chart(render.report_html(card([cert])))
    assert list(c.xticks) == ["0", "0.5", "1", "1.5"]
    x = lambda r: c.left + c.width * r / 1.5
    y = lambda a: c.top + c.height * (1 - a)
    expected = [(0.0, 0.5), (1.1376, 0.5), (1.1376, 0.0), (1.5, 0.0)]
    assert flat(c.lines["certified accuracy"]) == pytest.approx(flat((x(r), y(a)) for r, a in expected), abs=0.06)
    assert flat(markers(c.svg, "empirical robust accuracy"))[2:] == pytest.approx([x(1.5), y(0.5)], abs=0.06)


def test_interval_bounds_join_the_level_points_on_an_epsilon_axis():
    c = chart(render.report_html(card([interval_bounds()])))
    assert list(c.xticks) == ["0", "0.02", "0.04", "0.06"] and "epsilon (linf)" in c.svg
    x = lambda e: c.left + c.width * e / 0.06
    y = lambda a: c.top + c.height * (1 - a)
    assert flat(c.lines["certified accuracy"]) == pytest.approx(flat([(x(0.01), y(0.6)), (x(0.05), y(0.1))]), abs=0.06)
    assert flat(markers(c.svg, "certified accuracy")) == pytest.approx(flat([(x(0.01), y(0.6)), (x(0.05), y(0.1))]), abs=0.06)
    assert flat(markers(c.svg, "empirical robust accuracy")) == pytest.approx(flat([(x(0.01), y(0.9)), (x(0.05), y(0.6))]), abs=0.06)


def test_the_levels_table_shows_values_intervals_counts_and_violations():
    page = Page(render.report_html(card([smoothing(), interval_bounds()])))
    tables = page.tables["cert-levels"]
    assert [r for r in tables if r[0].startswith("epsilon")] == [["epsilon (linf)"] + tables[0][1:]]  # the second table's header
    assert tables[0] == ["radius (l2)", "certified accuracy", "95% CI", "certified points", "empirical robust accuracy", "robust points",
                         "violations / allowed"]
    rows = {r[0]: r[1:] for r in tables[1:]}
    assert rows["0.25 certified_accuracy:smoothing@0.25"] == ["0.8000", "[0.740, 0.850]", "160", "0.8500", "170", "0 / 2"]
    assert rows["0.5 certified_accuracy:smoothing@0.5"] == ["0.5500", "[0.480, 0.620]", "110", "0.7000", "140", "0 / 2"]
    assert rows["0.01 certified_accuracy:ibp@0.01"] == ["0.6000", "[0.531, 0.665]", "120", "0.9000", "180", "0 / 0"]
    settings = dict(r for r in page.tables["cert-settings"] if len(r) == 2)
    assert settings["sigma"] == "0.25" and settings["n"] == "10000" and settings["points"] == "200"
    assert settings["clean accuracy (smoothed classifier)"] == "0.9300 [0.886, 0.958]"
    assert settings["abstain rate (smoothed prediction)"] == "0.0400 [0.020, 0.077]"
    assert settings["abstain rate (certification)"] == "0.0500"
    assert settings["clean accuracy (the network)"] == "0.9500" and settings["method"] == "ibp"
    text = " ".join(page.alltext.split())
    assert "Per-point failure probability alpha = 0.001" in text and "the interval is over the 200 test points" in text
    assert "deterministic (alpha = 0)" in text


def test_the_interval_falls_back_to_the_scorecards_own():
    rec = card([smoothing()])
    del rec["certificates"][0]["metric_intervals"]
    rec["intervals"]["certified_accuracy:smoothing@0.25"] = [0.7123, 0.8456]
    (row, *_) = certificates_section(rec)["certs"][0]["rows"]
    assert row["ci"] == [0.7123, 0.8456]
    rows = Page(render.report_html(rec)).tables["cert-levels"]
    assert rows[1][2] == "[0.712, 0.846]"


def test_a_failing_soundness_check_is_shown_with_the_failing_class():
    detail = "certificate 'smoothing' is contradicted by an L2 PGD with EOT at 0.5: it claims robustness an attack disproves"
    html = render.report_html(card([smoothing(violations=(0, 7), soundness="fail", detail=detail)]))
    (table,) = re.findall(r'<table class="soundness">(.*?)</table>', html, re.S)
    assert '<tr class="row-fail"><th>soundness</th><td class="fail">fail</td>' in table and "contradicted by an L2 PGD" in table
    assert html.index('<table class="soundness">') < html.index('<figure class="certified">')  # above the chart, not below it
    row = re.search(r'<tr class="row-fail"><td>0\.5<br>.*?</tr>', html, re.S).group(0)
    assert '<td class="n fail">7 / 2</td>' in row  # 7 confident violations, 2 allowed by chance
    passing = render.report_html(card([smoothing()]))
    assert '<tr class="row-pass"><th>soundness</th><td class="pass">pass</td>' in passing and '<tr class="row-fail">' not in passing


def test_hostile_ids_and_labels_are_escaped():
    cert = smoothing(cid=HOSTILE)
    cert["levels"][0]["label"] = HOSTILE
    cert["name"] = HOSTILE
    cert["soundness"]["detail"] = HOSTILE
    html = render.report_html(card([cert]))
    assert "<script>x" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    page = audit(html)
    assert HOSTILE in page.alltext  # shown verbatim, as text
    assert f"{HOSTILE}: certified accuracy against the radius" in Page(figures(html, "certified")[0]).alltext  # the chart's title


def test_an_old_record_without_certificates_has_no_section():
    rec = card([smoothing()])
    del rec["certificates"]
    html = render.report_html(rec)
    assert 'id="certificates"' not in html and 'href="#certificates"' not in html and not figures(html, "certified")
    assert certificates_section(rec) is None and certificates_section({**rec, "certificates": []}) is None


# --- harness compare -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def versions() -> list[Scorecard]:
    """v1, and a v2 whose certified accuracy at 0.25 drops below v1's interval and at 0.5 stays within it."""
    v1 = card([smoothing(), interval_bounds()], name="v1")
    v2 = card([smoothing(certified=[0.88, 0.8, 0.7, 0.6, 0.52, 0.1], at=(0.7, 0.52), ci=((0.633, 0.76), (0.45, 0.59)),
                         empirical=(0.8, 0.66))], name="v2")
    v2["certificates"][0]["metrics"]["abstain_rate:smoothing"] = 0.09
    v2["metrics"]["abstain_rate:smoothing"] = 0.09
    return [Scorecard(v1), Scorecard(v2)]


def test_directions_of_the_certificate_families():
    assert DIRECTION["certified_accuracy"] == 1 and DIRECTION["abstain_rate"] == -1


def test_a_drop_beyond_the_interval_is_a_regression_and_one_within_it_is_not(versions):
    rec = compare_records(versions, ["v1", "v2"])
    status = {r["metric"]: r["status"][1] for r in rec["metrics"]}
    assert status["certified_accuracy:smoothing@0.25"] == "regression"  # 0.70 below [0.74, 0.85]
    assert status["certified_accuracy:smoothing@0.5"] == "neutral"  # 0.52 inside [0.48, 0.62]
    assert status["abstain_rate:smoothing"] == "regression"  # 0.09 above [0.0204, 0.0771]: abstaining more is worse
    partial = {p["metric"] for p in rec["partial_metrics"]}
    assert "certified_accuracy:ibp@0.01" in partial  # only v1 certifies with interval bounds
    (entry,) = rec["certificates"]  # ibp is in one version only: nothing to set it against
    assert entry["id"] == "smoothing" and entry["versions"] == ["v1", "v2"]
    cells = {r["label"]: r["cells"] for r in entry["rows"]}
    assert cells["0.25"][0]["certified"] == 0.8 and cells["0.25"][0]["ci"] == [0.74, 0.85] and cells["0.25"][0]["status"] == ""
    assert cells["0.25"][1]["certified"] == 0.7 and cells["0.25"][1]["status"] == "regression"
    assert cells["0.5"][1]["status"] == "neutral"


def test_the_comparison_draws_each_versions_certified_curve_and_empirical_points(versions):
    html = Comparison(compare_records(versions, ["v1", "v2"])).to_html()
    (svg,) = re.findall(r'<figure class="certified" data-certificate="smoothing">(.*?)</figure>', html, re.S)
    c = Chart(svg)
    assert list(c.lines) == ["v1: certified", "v1: empirical", "v2: certified", "v2: empirical"]
    x = lambda r: c.left + c.width * r / 0.8
    y = lambda a: c.top + c.height * (1 - a)
    assert c.lines["v1: certified"][0] == pytest.approx((x(0.0), y(0.9)), abs=0.06)
    assert c.lines["v2: certified"][0] == pytest.approx((x(0.0), y(0.88)), abs=0.06)
    assert (x(0.25), y(0.7)) == pytest.approx(c.lines["v2: certified"][4], abs=0.06)  # v2's step at 0.25 is 0.70
    assert flat(c.lines["v2: empirical"]) == pytest.approx(flat([(x(0.25), y(0.8)), (x(0.5), y(0.66))]), abs=0.06)
    colour = lambda name: re.search(rf'data-line="{re.escape(name)}"[^>]*stroke="(#[0-9a-f]+)"', svg).group(1)
    assert colour("v1: certified") == colour("v1: empirical") != colour("v2: certified")  # one colour per version
    tables = Page(html).tables["certificates"]
    assert tables[0] == ["level", "v1", "v2"]
    rows = {r[0]: r[1:] for r in tables[1:]}
    assert rows["0.25"][0].startswith("certified 0.8000 [0.740, 0.850]") and "empirical 0.8500" in rows["0.25"][0]
    assert rows["0.25"][1].startswith("certified 0.7000 [0.633, 0.760]") and "empirical 0.8000" in rows["0.25"][1]
    assert re.search(r'<td class="n regression"[^>]*>certified 0\.7000', html)  # the regression is marked in the rows too


def test_a_comparison_without_certificates_has_no_certificates_part(versions):
    plain = [Scorecard({**copy.deepcopy(v.record), "certificates": []}) for v in versions]
    for s in plain:
        s.record["metrics"]["robust_accuracy:pgd@0.1"] = 0.5  # something to compare beyond clean accuracy
    rec = compare_records(plain, ["v1", "v2"])
    assert rec["certificates"] == []
    assert "<h3>Certificates</h3>" not in Comparison(rec).to_html()


def test_hostile_ids_are_escaped_in_the_comparison_and_broken_soundness_is_marked():
    v1 = card([smoothing(cid=HOSTILE)], name="v1")
    v2 = card([smoothing(cid=HOSTILE, violations=(0, 5), soundness="fail")], name="v2")
    html = Comparison(compare_records([Scorecard(v1), Scorecard(v2)], ["v1", "v2"])).to_html()
    assert "<script>x" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    page = audit(html)
    assert [a["data-certificate"] for a in page.find("figure") if "data-certificate" in a] == [HOSTILE]
    assert '<span class="fail">violations 5 / 2</span>' in html and '<span class="">violations 0 / 2</span>' in html
