"""`harness compare` and `harness.compare`: model versions side by side, from real runs on the digits."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import harness
from harness.reports.comparison import Comparison, compare_records
from harness.core.errors import BadInput
from harness.reports.scorecard import Scorecard

ATTACKS = [{"name": "fgsm", "norm": "linf", "epsilons": [0.05, 0.1]},
           {"name": "pgd", "norm": "linf", "epsilons": [0.05, 0.1], "steps": 5}]
GATES = [{"metric": "clean_accuracy", "min": 0.9}, {"metric": "robust_accuracy:worst-linf@0.1", "min": 0.3}]
WORST = "robust_accuracy:worst-linf@0.1"


def _run(out: Path, **overrides) -> Path:
    cfg = {"name": "digits-cnn", "data": {"source": "builtin:digits", "limit": 100}, "attacks": ATTACKS, "gates": GATES, **overrides}
    harness.run(cfg, out=out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Real runs, each a saved scorecard directory: a strong model, a weak one on the same samples,
    one on other samples of the same source, one with attacks the others do not share."""
    root = tmp_path_factory.mktemp("versions")
    return {
        "strong": _run(root / "strong"),
        "weak": _run(root / "weak", name="digits-linear", model={"source": "python:tests.conftest:tiny_linear"}),
        "fewer": _run(root / "fewer", data={"source": "builtin:digits", "limit": 60}, attacks=ATTACKS[:1], gates=[]),
        "other": _run(root / "other", attacks=[{"name": "fgsm", "norm": "linf", "epsilons": [0.3]}], gates=[]),
    }


@pytest.fixture(scope="module")
def pair(runs) -> Comparison:
    return harness.compare(runs["strong"], runs["weak"])


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of a scorecard directory with its scorecard.json changed by `edit(record)`."""
    shutil.copytree(src, dst)
    record = json.loads((dst / "scorecard.json").read_text())
    edit(record)
    (dst / "scorecard.json").write_text(json.dumps(record))
    return dst


class Tables(HTMLParser):
    """Every <table> of a page as rows of (cell tag, class, text); <script> elements are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str, str]]]] = {}
        self.scripts = 0
        self._table = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("class") or f"table{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = [tag, a.get("class") or "", ""]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append((self._cell[0], self._cell[1], " ".join(self._cell[2].split())))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += " " + data


def _parse(html: str) -> Tables:
    t = Tables()
    t.feed(html)
    return t


def _decode(directory: Path) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """outcomes.json read by hand (ids, flags, labels), not through harness.verdicts.outcomes."""
    body = json.loads((directory / "outcomes.json").read_text())
    n = body["n"]
    ids = np.frombuffer(base64.b64decode(body["ids"]), dtype="<i8")
    flags = {m: np.unpackbits(np.frombuffer(base64.b64decode(v), dtype=np.uint8))[:n].astype(bool) for m, v in body["flags"].items()}
    return ids, flags, np.frombuffer(base64.b64decode(body["labels"]), dtype="<i8")


def _one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert lines[0].startswith("harness: error: ")
    return lines[0]


def test_one_column_per_version_with_shared_metrics_and_deltas(pair, runs):
    strong, weak = (Scorecard.load(runs[k]) for k in ("strong", "weak"))
    page = _parse(pair.to_html())
    assert page.scripts == 0
    header = page.tables["metrics"][0]
    assert [text for _, _, text in header] == ["metric", "digits-cnn", "digits-linear"]
    rows = {r[0][2]: r for r in page.tables["metrics"][1:]}
    assert set(rows) == set(strong.metrics) == set(weak.metrics)  # the same suite: every metric is shared
    assert all(len(r) == 3 for r in rows.values())
    for m, row in rows.items():
        delta = weak.metrics[m] - strong.metrics[m]
        assert row[2][2].startswith(f"{weak.metrics[m]:.4f} {delta:+.4f}".replace("-", "−")), (m, row)
    # an untrained linear model: clean and worst-case accuracy fall far outside the reference's interval
    for m in ("clean_accuracy", WORST):
        assert weak.metrics[m] < strong.record["intervals"][m][0]
        assert "regression" in rows[m][2][1].split() and "worse" in rows[m][2][2]
    assert json.loads(json.dumps(pair.record, allow_nan=False)) == pair.record  # the record is plain data
    record_rows = {r["metric"]: r for r in pair.record["metrics"]}
    assert record_rows["clean_accuracy"]["status"] == [None, "regression"]
    assert pair.record["versions"][1]["regressions"] == sum(r["status"][1] == "regression" for r in record_rows.values()) >= 2
    versions = page.tables["versions"]
    assert [c[2] for c in versions[0]][1:] == ["digits-cnn reference", "digits-linear"]
    assert [c[2] for c in versions[1]] == ["verdict", strong.verdict.upper(), weak.verdict.upper()]


def test_colours_follow_each_metric_direction(runs):
    """Accuracy down, attack success up, median perturbation down: regressions; the reverse: improvements;
    a change inside the reference's 95% interval: neutral."""
    ref = Scorecard.load(runs["strong"])
    asr, ra = "attack_success_rate:pgd-linf@0.1", "robust_accuracy:pgd-linf@0.05"
    lo, hi = ref.record["intervals"][asr]
    assert 0.0 < lo and hi < 1.0 and ref.record["intervals"][ra][1] < 1.0

    def variant(asr_value: float, ra_value: float, mp: float) -> Scorecard:
        rec = copy.deepcopy(ref.record)
        rec["metrics"].update({asr: asr_value, ra: ra_value, "median_perturbation:deepfool-l2": mp})
        return Scorecard(rec)

    base = variant(ref.metrics[asr], ref.metrics[ra], 0.5)
    worse = compare_records([base, variant(hi + 0.01, 0.0, 0.4)], ["ref", "worse"])
    better = compare_records([base, variant(max(lo - 0.01, 0.0), 1.0, 0.6)], ["ref", "better"])
    same = compare_records([base, variant((ref.metrics[asr] + hi) / 2, ref.metrics[ra], 0.5)], ["ref", "same"])
    status = lambda rec, m: {r["metric"]: r["status"][1] for r in rec["metrics"]}[m]
    for m in (asr, ra, "median_perturbation:deepfool-l2"):
        assert status(worse, m) == "regression" and status(better, m) == "improvement" and status(same, m) == "neutral", m
    assert {r["metric"]: r["basis"] for r in worse["metrics"]}["median_perturbation:deepfool-l2"] == "point"


def test_gates_are_shown_with_each_versions_verdict(pair, runs):
    strong, weak = (Scorecard.load(runs[k]) for k in ("strong", "weak"))
    rows = _parse(pair.to_html()).tables["gates"]
    assert [c[2] for c in rows[0]] == ["gate", "digits-cnn", "digits-linear"]
    by_gate = {r[0][2]: r for r in rows[1:]}
    assert set(by_gate) == {f"{g['metric']} {g['op']} {g['threshold']}" for g in strong.gates}
    for g_strong, g_weak in zip(strong.gates, weak.gates):
        row = by_gate[f"{g_strong['metric']} {g_strong['op']} {g_strong['threshold']}"]
        assert (row[1][1], row[2][1]) == (g_strong["verdict"], g_weak["verdict"])
    assert by_gate["clean_accuracy >= 0.9"][1][1] == "pass" and by_gate["clean_accuracy >= 0.9"][2][1] == "fail"


def test_curves_overlay_both_versions_per_norm(pair):
    html = pair.to_html()
    figures = re.findall(r'<figure class="curve" data-norm="([^"]+)">(.*?)</figure>', html, re.S)
    assert [norm for norm, _ in figures] == ["linf"]
    svg = figures[0][1]
    assert svg.count("<svg") == 1 and svg.count("<polyline") == 2
    assert "digits-cnn: worst" in svg and "digits-linear: worst" in svg
    lines = pair.record["curves"]["linf"]
    assert [p[0] for p in lines["digits-cnn: worst"]] == [0.05, 0.1]


def test_flips_match_the_outcomes_files(pair, runs):
    from scipy.stats import binomtest

    ids_a, flags_a, labels_a = _decode(runs["strong"])
    ids_b, flags_b, _ = _decode(runs["weak"])
    assert (ids_a == ids_b).all()  # the same 100 samples
    flips = pair.record["flips"]
    assert len(flips) == 1 and flips[0]["version"] == "digits-linear" and flips[0]["note"] == ""
    got = {m["metric"]: m for m in flips[0]["metrics"]}
    assert set(got) == {m for m in flags_a if m.startswith("robust_accuracy:")}
    for m, row in got.items():
        lost, gained = flags_a[m] & ~flags_b[m], ~flags_a[m] & flags_b[m]
        assert (row["n_pairs"], row["robust_to_broken"], row["broken_to_robust"]) == (ids_a.size, int(lost.sum()), int(gained.sum()))
        assert {r["class"]: (r["lost"], r["gained"]) for r in row["by_class"]} == {
            int(c): (int((lost & (labels_a == c)).sum()), int((gained & (labels_a == c)).sum())) for c in np.unique(labels_a)}
        discordant = int(lost.sum() + gained.sum())
        if discordant:  # exact McNemar: the smaller discordant count against Binomial(D, 1/2), two-sided
            assert row["p_value"] == pytest.approx(binomtest(int(lost.sum()), discordant, 0.5).pvalue, rel=1e-9)
    worst = got[WORST]
    assert worst["robust_to_broken"] > worst["broken_to_robust"] and worst["p_value"] < 0.05
    table = _parse(pair.to_html()).tables["flips"]
    row = next(r for r in table if r[0][2] == WORST)
    assert [c[2] for c in row[1:5]] == [str(ids_a.size), str(worst["robust_to_broken"]), str(worst["broken_to_robust"]),
                                        f"{worst['p_value']:.2g}"]


def test_flips_need_outcomes_on_both_sides(runs, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(runs["weak"], bare)
    (bare / "outcomes.json").unlink()
    comparison = harness.compare(runs["strong"], bare)
    assert comparison.record["flips"][0]["metrics"] == []
    assert "no per-sample outcomes" in comparison.record["flips"][0]["note"] and "digits-linear" in comparison.record["flips"][0]["note"]
    assert "Not paired: no per-sample outcomes" in comparison.to_html()


def test_three_versions_through_the_cli(cli, runs, tmp_path):
    out = tmp_path / "three.html"
    result = cli("compare", str(runs["strong"]), str(runs["weak"]), str(runs["strong"] / "scorecard.json"), "--out", str(out))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("digits-cnn: ") and lines[0].endswith("(reference)")
    assert lines[1].startswith("digits-linear: FAIL") and "regression(s)" in lines[1]
    assert lines[2].startswith("digits-cnn (2): ") and "; 0 regression(s), 0 improvement(s) against digits-cnn" in lines[2]
    assert lines[-1] == f"comparison: {out}"
    page = _parse(out.read_text())
    assert [c[2] for c in page.tables["metrics"][0]] == ["metric", "digits-cnn", "digits-linear", "digits-cnn (2)"]
    assert all(len(r) == 4 for r in page.tables["gates"])
    record = harness.compare(runs["strong"], runs["weak"], runs["strong"]).record
    same = record["flips"][1]
    assert same["version"] == "digits-cnn (2)"
    assert all(m["robust_to_broken"] == m["broken_to_robust"] == 0 and m["p_value"] == 1.0 for m in same["metrics"])


def test_cli_labels_and_default_output(cli, runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("compare", str(runs["strong"]), str(runs["weak"]), "--label", "v1", "--label", "v2")
    assert result.exit_code == 0, result.output
    written = list((tmp_path / "reports").glob("compare-*.html"))
    assert len(written) == 1 and result.stdout.splitlines()[-1] == f"comparison: {Path('reports') / written[0].name}"
    assert [c[2] for c in _parse(written[0].read_text()).tables["gates"][0]] == ["gate", "v1", "v2"]
    assert "label(s) for 2 scorecard(s)" in _one_line_error(cli("compare", str(runs["strong"]), str(runs["weak"]), "--label", "v1"))


@pytest.mark.parametrize("case, expected", [
    ("one", "needs at least two scorecards"),
    ("schema", "unsupported scorecard schema_version 2"),
    ("source", "measured on npz:elsewhere.npz (split test) but the reference 'digits-cnn' on builtin:digits (split test)"),
    ("split", "measured on builtin:digits (split train)"),
    ("hash", "both use builtin:digits (split test) but different samples: dataset_sha256"),
    ("nothing-shared", "share no metric beyond clean_accuracy"),
])
def test_refusals_exit_2_with_one_line(cli, runs, tmp_path, case, expected):
    def prov(key, value):
        return lambda r: r["provenance"].__setitem__(key, value)

    other = {
        "schema": lambda: _edited(runs["weak"], tmp_path / "v", lambda r: r.__setitem__("schema_version", 2)),
        "source": lambda: _edited(runs["weak"], tmp_path / "v", prov("data_source", "npz:elsewhere.npz")),
        "split": lambda: _edited(runs["weak"], tmp_path / "v", prov("split", "train")),
        "hash": lambda: runs["fewer"],
        "nothing-shared": lambda: runs["other"],
    }
    args = [str(runs["strong"])] + ([] if case == "one" else [str(other[case]())])
    line = _one_line_error(cli("compare", *args, "--out", str(tmp_path / "c.html")))
    assert expected in line, line
    assert not (tmp_path / "c.html").exists()


def test_refusals_from_python(runs):
    strong = Scorecard.load(runs["strong"])
    newer = Scorecard({**strong.record, "schema_version": 2})
    with pytest.raises(BadInput, match="schema_version 2 of 'digits-cnn \\(2\\)' differs from 1"):
        compare_records([strong, newer], None)
    with pytest.raises(BadInput, match="at least two"):
        harness.compare(strong)
    with pytest.raises(BadInput, match="expected a Scorecard or the path"):
        harness.compare(strong, 42)


def test_metrics_only_some_versions_have_are_listed_not_compared(runs):
    strong, weak = Scorecard.load(runs["strong"]), Scorecard.load(runs["weak"])
    rec = copy.deepcopy(weak.record)
    del rec["metrics"]["robust_accuracy:pgd-linf@0.05"]
    comparison = harness.compare(strong, Scorecard(rec, weak.outcomes))
    assert comparison.record["partial_metrics"] == [
        {"metric": "robust_accuracy:pgd-linf@0.05", "in": ["digits-cnn"], "missing": ["digits-linear"]}]
    assert "robust_accuracy:pgd-linf@0.05" not in [r["metric"] for r in comparison.record["metrics"]]
    assert "robust_accuracy:pgd-linf@0.05" not in [m["metric"] for m in comparison.record["flips"][0]["metrics"]]
    assert "robust_accuracy:pgd-linf@0.05: in digits-cnn; not in digits-linear" in comparison.to_html()


def test_hostile_names_are_escaped(cli, runs, tmp_path):
    hostile = '<script>alert("x")</script>'
    evil = _edited(runs["weak"], tmp_path / "evil", lambda r: r.__setitem__("name", hostile))
    out = tmp_path / "c.html"
    assert cli("compare", str(runs["strong"]), str(evil), "--out", str(out), "--label", "ok", "--label", hostile + "&").exit_code == 0
    html = out.read_text()
    assert _parse(html).scripts == 0 and "<script" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;" in html
    assert _parse(harness.compare(runs["strong"], evil)._repr_html_()).scripts == 0


def test_the_page_is_self_contained(pair, tmp_path):
    path = pair.save(tmp_path / "sub" / "c.html")
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            'style-src \'unsafe-inline\'">') in html
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//|url\(|@import", html, re.I)
    assert not re.search(r"https?://", re.sub(r'\sxmlns(?::\w+)?="[^"]*"', "", html))  # a namespace name is not a load
    assert "<script" not in html
    assert not re.search(r"<[^>]+\son\w+\s*=", html)  # no inline event handlers either


def test_notebook_display(runs):
    import harness.reports.comparison  # noqa: F401  (importing the module must not shadow harness.compare)

    for comparison in (harness.compare(runs["strong"], runs["weak"]),):
        assert isinstance(comparison, Comparison)
        snippet = comparison._repr_html_()
        assert "<html" not in snippet and "<!DOCTYPE" not in snippet
        assert snippet.lstrip().startswith("<style>") and ".hc-cmp " in snippet and 'class="hc-cmp"' in snippet
        assert all(line.startswith(".hc-cmp") or line.startswith("@media") or line.startswith("<") or not line
                   for line in snippet.split("</style>")[0].replace("<style>", "").strip().splitlines())
        tables = _parse(snippet).tables
        assert [c[2] for c in tables["metrics"][0]] == ["metric", "digits-cnn", "digits-linear"]
        assert "by-class" not in tables  # the compact view leaves the per-class tables to the page
    assert repr(comparison) == "<Comparison of 2 versions: digits-cnn, digits-linear>"
