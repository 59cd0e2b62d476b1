"""report.html, compare.html and the inline (Jupyter) HTML opened in a real headless Chromium.

Debian's `chromium` driven by Playwright's Python package (Playwright's own browser download is
never used). Without chromium or playwright these tests skip, naming what is missing; with
HARNESS_BROWSER_TESTS=require (set by .ci/run once chromium is installed) they fail instead, so a
CI run cannot go green by skipping them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

# Two norms, so the report draws two charts; small budgets keep both runs to a few seconds.
SUITE: dict[str, Any] = {
    "name": "browser-builtin",
    "seed": 0,
    "model": {"source": "builtin:digits-cnn"},
    "data": {"source": "builtin:digits", "split": "test", "limit": 120, "batch_size": 64},
    "attacks": [
        {"name": "fgsm", "norm": "linf", "epsilons": [0.05, 0.1]},
        {"name": "pgd", "norm": "linf", "epsilons": [0.05, 0.1], "steps": 5},
        {"name": "pgd", "norm": "l2", "epsilons": [0.5, 1.0], "steps": 5},
    ],
    "gates": [{"metric": "clean_accuracy", "min": 0.9}, {"metric": "robust_accuracy:worst-linf@0.05", "min": 0.5}],
}
NORMS = {"linf": re.compile(r"linf|l∞|l-inf", re.I), "l2": re.compile(r"\bl2\b|l₂", re.I)}
WIDTHS = (1280, 390)  # a laptop and a phone


def _missing() -> str | None:
    if shutil.which("chromium") is None:
        return "no `chromium` on PATH (Debian: apt-get install -y chromium; .ci/run installs it)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is missing (pip install -e '.[dev]')"
    return None


MISSING = _missing()
REQUIRED = os.environ.get("HARNESS_BROWSER_TESTS") == "require"
pytestmark = pytest.mark.skipif(MISSING is not None and not REQUIRED, reason=MISSING or "")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if MISSING:
        pytest.fail(f"HARNESS_BROWSER_TESTS=require, but the browser tests cannot run: {MISSING}", pytrace=False)
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        chromium = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        yield chromium
        chromium.close()
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_model) -> dict[str, Path]:
    """Two saved runs of SUITE: the builtin model and one trained for two epochs."""
    import harness
    from harness.sources.builtin import RECIPE, train_digits_cnn

    root = tmp_path_factory.mktemp("browser")
    harness.run(SUITE, out=root / "a", show_progress=False)
    quick, _ = train_digits_cnn({**RECIPE, "epochs": 2})
    harness.run({**SUITE, "name": "browser-two-epochs"}, model=quick, out=root / "b", show_progress=False)
    return {"a": root / "a", "b": root / "b"}


@pytest.fixture(scope="module")
def compare_html(runs) -> Path:
    """`harness compare A B --out compare.html` of the two runs."""
    from click.testing import CliRunner
    from harness.cli import cli

    out = runs["a"].parent / "compare.html"
    result = CliRunner().invoke(cli, ["compare", str(runs["a"] / "scorecard.json"), str(runs["b"] / "scorecard.json"),
                                      "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.is_file(), f"harness compare --out {out} wrote no file"
    return out


class Page:
    """A page with every console message, page error and request it made recorded."""

    def __init__(self, browser: Any, javascript: bool = True) -> None:
        self.context = browser.new_context(offline=True, java_script_enabled=javascript, viewport={"width": WIDTHS[0], "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))

    def outside(self, own: str) -> list[str]:
        """Requests other than the page's own file and data: URIs."""
        return [u for u in self.requests if u != own and not u.startswith("data:")]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser) -> Iterator[Any]:
    pages: list[Page] = []

    def open_(path: Path | None = None, html: str | None = None, javascript: bool = True) -> Page:
        p = Page(browser, javascript)
        pages.append(p)
        if path is not None:
            p.page.goto(path.as_uri(), wait_until="load")
        else:
            p.page.set_content(html, wait_until="load")
        return p

    yield open_
    for p in pages:
        p.close()


_CHARTS_JS = """() => [...document.querySelectorAll('svg')].map(s => {
  const r = s.getBoundingClientRect();
  const lines = [...s.querySelectorAll('polyline, path')].filter(e =>
      (e.getAttribute('points') || e.getAttribute('d') || '').trim().length > 0);
  return {label: (s.getAttribute('aria-label') || '') + ' ' + s.textContent, lines: lines.length,
          width: r.width, height: r.height,
          shown: getComputedStyle(s).visibility !== 'hidden' && getComputedStyle(s).display !== 'none'};
})"""


def assert_charts(page: Any, min_lines: int = 1) -> None:
    """A visible chart (an <svg> drawing polylines or paths) per norm of SUITE."""
    charts = [c for c in page.evaluate(_CHARTS_JS) if c["lines"] >= min_lines]
    for norm, pattern in NORMS.items():
        drawn = [c for c in charts if pattern.search(c["label"])]
        assert drawn, f"no chart with {min_lines}+ lines for {norm}; svgs: {[c['label'][:60] for c in page.evaluate(_CHARTS_JS)]}"
        assert any(c["shown"] and c["width"] > 50 and c["height"] > 50 for c in drawn), f"the {norm} chart is not visible: {drawn}"


def assert_verdict_visible(page: Any, verdict: str) -> None:
    """The verdict is shown near the top of the page, not only somewhere in a table."""
    banner = page.get_by_text(re.compile(rf"\b{verdict}\b", re.I))
    boxes = [banner.nth(i).bounding_box() for i in range(banner.count()) if banner.nth(i).is_visible()]
    assert any(b is not None and b["y"] < 400 for b in boxes), f"no visible {verdict!r} in the page's first 400 px: {boxes}"


# The elements that stick out past the viewport, outermost first: what to fix when a page overflows.
_WIDE_JS = """() => {
  const clipped = e => { for (let a = e.parentElement; a; a = a.parentElement)
    if (['auto', 'scroll', 'hidden', 'clip'].includes(getComputedStyle(a).overflowX)) return true; return false; };
  const out = e => e.getBoundingClientRect().right > window.innerWidth + 1 && !clipped(e);
  return [...document.body.querySelectorAll('*')].filter(e => out(e) && !(e.parentElement && out(e.parentElement)))
  .slice(0, 5).map(e => `<${e.tagName.toLowerCase()} class="${e.getAttribute('class') || ''}"> ${Math.round(e.getBoundingClientRect().right)} px`); }"""


def assert_fits(page: Any) -> None:
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        scroll, inner = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert scroll <= inner + 1, f"horizontal overflow at {width} px: the page is {scroll} px wide; {page.evaluate(_WIDE_JS)}"
    page.set_viewport_size({"width": WIDTHS[0], "height": 900})


def assert_prints(page: Any) -> None:
    pdf = page.pdf(format="A4", print_background=True)
    assert pdf.startswith(b"%PDF-") and re.search(rb"/Type\s*/Page\b", pdf), "page.pdf() did not produce a PDF with pages"
    page.emulate_media(media="print")
    try:
        assert_charts(page)
    finally:
        page.emulate_media(media="screen")


def test_report_html_in_chromium(runs, open_page):
    card = json.loads((runs["a"] / "scorecard.json").read_text())
    report = runs["a"] / "report.html"
    p = open_page(report)
    assert_charts(p.page)
    assert_verdict_visible(p.page, card["verdict"])
    for gate in card["gates"]:
        assert p.page.get_by_text(gate["metric"], exact=False).count() > 0, f"gate {gate['metric']} not in the report"
    assert_fits(p.page)
    assert_prints(p.page)
    assert p.outside(report.as_uri()) == [], f"the report fetched {p.outside(report.as_uri())}"
    assert p.errors == []


def test_compare_html_in_chromium(runs, compare_html, open_page):
    page_file = compare_html
    p = open_page(page_file)
    text = p.page.inner_text("body")
    for run in ("a", "b"):
        name = json.loads((runs[run] / "scorecard.json").read_text())["name"]
        assert name in text, f"{name} missing from compare.html"
    assert "clean_accuracy" in text
    assert_charts(p.page)
    assert_fits(p.page)
    assert_prints(p.page)
    assert p.outside(page_file.as_uri()) == [], f"compare.html fetched {p.outside(page_file.as_uri())}"
    assert p.errors == []


def _styles(page: Any) -> dict[str, str]:
    return page.evaluate("""() => Object.fromEntries(['#probe-p', '#probe-td', 'body'].map(sel => {
      const s = getComputedStyle(document.querySelector(sel));
      return [sel, [s.fontFamily, s.fontSize, s.color, s.padding, s.borderTopWidth, s.borderTopStyle, s.margin].join('|')];
    }))""")


_HOST = "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body><p id='probe-p'>notebook text</p>" \
        "<table><tr><td id='probe-td'>a notebook table</td></tr></table>{fragment}</body></html>"


@pytest.mark.parametrize("javascript", [True, False], ids=["js", "no-js"])
def test_scorecard_repr_html_in_chromium(runs, open_page, javascript):
    """The inline HTML a notebook shows: self-contained, drawn without scripts (an untrusted
    notebook runs none), and styled without restyling the notebook page around it."""
    from harness.reports.scorecard import Scorecard

    card = Scorecard.load(runs["a"])
    fragment = card._repr_html_()
    host = open_page(html=_HOST.format(fragment=""), javascript=javascript)
    p = open_page(html=_HOST.format(fragment=fragment), javascript=javascript)
    assert_charts(p.page)
    assert_verdict_visible(p.page, card.verdict)
    for gate in card.gates:
        assert gate["metric"] in p.page.inner_text("body")
    assert _styles(p.page) == _styles(host.page), "the inline scorecard's CSS restyles the page around it"
    assert_fits(p.page)
    assert p.outside("about:blank") == [], f"the inline scorecard fetched {p.outside('about:blank')}"
    assert p.errors == []


def test_compare_repr_html_in_chromium(runs, open_page):
    import harness
    from harness.reports.scorecard import Scorecard

    shown = harness.compare(Scorecard.load(runs["a"]), Scorecard.load(runs["b"]))
    p = open_page(html=_HOST.format(fragment=shown._repr_html_()), javascript=False)
    text = p.page.inner_text("body")
    assert "browser-builtin" in text and "browser-two-epochs" in text
    assert_charts(p.page)
    assert_fits(p.page)
    assert p.outside("about:blank") == [] and p.errors == []
